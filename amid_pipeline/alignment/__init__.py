"""Cross-tokenizer distillation from cached shards (docs/cross-tokenizer.md).

A stored teacher row becomes a row in the student's tokens: ``vocabulary`` maps every teacher id to a
student id by its bytes; ``rows`` re-tokenises the row's text with the student's tokenizer, keeps the
positions where both tokenisations place a boundary at the same byte, and carries the teacher's
next-token distribution there onto student ids. Every loss then applies unchanged.
"""
