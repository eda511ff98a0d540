"""The dataset stage: which rows of which dataset (:class:`DatasetSettings`) and how each becomes a token
sequence with its supervised targets (:mod:`amid_pipeline.dataset.examples`). Capture, ``sft``, ``distill``'s
checks and ``eval`` all read rows through it; the teacher's own generation stays in ``capture/``."""
