"""Training HTC-VLM: a byte-level BPE tokenizer, then stage 1 (MGVQ), stage 0 (the vision tower) and
stage 2 (HTC-VLM on the answers).

- recipe: `TrainConfig`, what a run trains with, and the variants of the paper's Table 4
- data: what training reads beyond the shared pools (`htcvlm.pool`): the tokenizer, LLaVA pools
- loop: the learning-rate schedule and the training state saved for resuming
- stages: stage 1 (`train_mgvq`), stage 0 (`train_vision`) and stage 2 (`train_vlm`)
- run: `run_training`, the whole recipe into a checkpoint folder
- stream: stage 2's data as positions fixed by (seed, step, worker), and the Ray Data stage making rows
- distributed: stage 2 on Ray Train (`onetoken train --workers N`), fed by Ray Data; Ray imported lazily

Evaluation (`htcvlm.evaluate`) reads pools and never imports training.
"""
