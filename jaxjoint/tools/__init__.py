"""Tools around the library that the main path never imports.

- ``train_mlm``: ``jaxjoint train-mlm``, how the embedded default model was made;
- ``mlm_batches``: its training batches (BERT masking, length buckets);
- ``heldout``: pseudo-perplexity and masked-token accuracy on held-out text;
- ``corpus``: the WordNet corpus and WordPiece tokenizer.
"""
