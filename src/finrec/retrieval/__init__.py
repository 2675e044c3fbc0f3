"""Candidate retrieval: a two-tower embedding model and nearest-neighbour indexes over its item embeddings.

``two_tower`` trains the user and item towers (Yi et al., RecSys 2019: in-batch sampled softmax with logQ
correction); ``index`` finds the top-k items for a batch of user embeddings, exactly or approximately
(hnswlib, faiss), with per-user exclusion masks.
"""
