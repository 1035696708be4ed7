# The hosted demo: `docker build -t sparsity-explorer . && docker run -p 8501:8501 sparsity-explorer`
FROM python:3.11-slim
WORKDIR /app
COPY requirements.txt .
# The CPU build of torch; the other packages come from PyPI.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt
COPY . .
ENV SPARSITY_APP_CACHE_DIR=/app/cache
EXPOSE 8501
CMD ["streamlit", "run", "app.py", "--server.address=0.0.0.0", "--server.port=8501", "--server.headless=true"]
