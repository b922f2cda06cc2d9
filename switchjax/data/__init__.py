"""Data: T5 tokenizer, span corruption, corpora and the pretraining input pipeline.

tokenizer.py        Tokenizer (SentencePiece with T5's pad/eos/unk and sentinel ids),
                    train_tokenizer
span_corruption.py  T5 span corruption in NumPy
corpus.py           the embedded default corpus, user files, tokenized and cached corpora
cache.py            the cache directory and atomic writes
prepared.py         prepared corpora: parts + manifest on shared storage, read by row
pipeline.py         make_pretraining_data: global, host-sharded, resumable batches
"""

from switchjax.data.cache import cache_dir
from switchjax.data.corpus import (
  DefaultCorpus,
  FileCorpus,
  TokenChunks,
  default_documents,
  get_tokenizer,
  open_corpus,
  read_documents,
  resolve_paths,
  token_dtype,
  tokenize_corpus,
)
from switchjax.data.pipeline import (
  ChunkSplit,
  PretrainingData,
  SpanCorruptionTask,
  TrainIterator,
  make_batch,
  make_pretraining_data,
)
from switchjax.data.span_corruption import (
  check_sentinels,
  noise_span_to_unique_sentinel,
  nonnoise_span_to_unique_sentinel,
  num_noise_spans,
  random_spans_helper,
  random_spans_noise_mask,
  reconstruct_tokens,
  span_corruption,
)
from switchjax.data.tokenizer import (
  EOS_ID,
  PAD_ID,
  UNK_ID,
  Tokenizer,
  check_t5_layout,
  train_tokenizer,
)
