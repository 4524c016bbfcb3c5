"""The fast ops behind the model, each chosen by the forward's plan (longformer/plan.py): the band paths
(banded.py, strided.py), re-associated global attention, and the lean linear, LayerNorm, dropout, loss and tied
embedding of training."""
