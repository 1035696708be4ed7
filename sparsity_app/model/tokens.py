"""The one lock every tokenizer call of the project takes, and the longest text it encodes."""
import threading

# A fast tokenizer's truncation/padding settings are shared Rust state that each call may reset; a
# call that resets them while another thread encodes fails with "Already borrowed"
# (huggingface/tokenizers#537, transformers#47085). Every tokenizer call of the project takes this
# lock; tokenizing is ~1% of an evaluation.
TOKENIZER_LOCK = threading.Lock()

MAX_LENGTH = 256  # tokens per text at most: all-MiniLM-L6-v2's max_seq_length in sentence-transformers
