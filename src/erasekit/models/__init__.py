"""Model-side code: the offline CLIP tokenizer, the family table, loading, and tiny model factories."""
