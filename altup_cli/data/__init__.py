"""Corpora, tokenizers and token streams, plain Python: `corpora` (the embedded registry
archives, sha256-checked and cached; local text files; Hugging Face datasets), `tokenizer`
(a byte-level BPE trained on the corpus and cached, or the user's files), `tokens` (the
tokenized corpus as one cached array, its unigram entropy, epochs covered) and `cache`.
It imports only errors, files and console; config, runs, training, evaluation and the
commands import it.
"""

# 256 bytes + EOS: the smallest vocabulary a tokenizer here has (a byte-level BPE with no
# merges). Config checks stand it in for the tokenizer's size before the tokenizer exists.
MIN_VOCAB_SIZE = 257
