"""The LCO-Emb pipeline stages: pretrain, contrast, evaluate, and the pieces they share."""
