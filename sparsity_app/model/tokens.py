"""The one lock every tokenizer call of the project takes."""
import threading

# A fast tokenizer's truncation/padding settings are shared Rust state that each call may reset; a
# call that resets them while another thread encodes fails with "Already borrowed"
# (huggingface/tokenizers#537, transformers#47085). Every tokenizer call of the project takes this
# lock; tokenizing is ~1% of an evaluation.
TOKENIZER_LOCK = threading.Lock()
