"""Stage 1: PDFs and text corpora to page images + page text, and retrieval eval sets."""
