"""Tools around the library that the main path never imports.

- ``train_mlm``: ``jaxjoint train-mlm``, how the embedded default model was made;
- ``corpus``: its WordNet corpus and WordPiece tokenizer.
"""
