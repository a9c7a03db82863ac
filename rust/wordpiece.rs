//! BERT WordPiece tokenizer (placeholder: filled in by the tokenizer work).
