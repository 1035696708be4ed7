# The hosted demo:
#   docker build -t sparsity-explorer . && docker run -p 8501:8501 -v sparsity-cache:/app/cache sparsity-explorer
# tests/test_docker.py runs these steps (the pip RUN, ENV, a non-root user, CMD, HEALTHCHECK) in a fresh virtualenv.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 SPARSITY_APP_CACHE_DIR=/app/cache
WORKDIR /app
COPY requirements.txt .
# The CPU build of torch (without the extra index pip pulls GBs of CUDA); the other packages come from PyPI.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt
COPY . .
# A user without privileges that may write only the result cache (and its own home).
RUN useradd --create-home --uid 10001 app && mkdir -p /app/cache && chown app /app/cache
USER app
# Results and tuned schedules outlive the container; limits: see "Hosting" in README.md (SPARSITY_APP_* variables).
VOLUME /app/cache
EXPOSE 8501
# slim has no curl: Python asks Streamlit's health endpoint.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=5).status != 200)"
CMD ["streamlit", "run", "app.py", "--server.address=0.0.0.0", "--server.port=8501", "--server.headless=true"]
