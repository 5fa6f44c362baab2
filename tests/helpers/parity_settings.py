"""The runs of the parity tests (the sharded trainer on 2 gloo ranks against the plain
reference DLRM of reference_dlrm.py): a small model on random data (BASE), the optimizers
(SGD, ADAGRAD), how many steps they train (STEPS), and how close outputs and parameters
must stay (TOL)."""

TOL = 1e-5
STEPS = 3
BASE = [
    "model.dense_in_features=5", "model.bottom_mlp=[16,8]", "model.top_mlp=[16,1]",
    "embeddings.dim=8", "embeddings.num_embeddings_per_feature=[40,60,30,50]",
    "data.source=random", "data.batch_size=32", "data.train_samples=96", "data.eval_samples=32",
    "data.num_indices_per_lookup=3", "data.num_indices_per_lookup_fixed=false",
    "logging.log_every_n_steps=1", "training.seed=7",
]
SGD = ["optimizer.dense=sgd", "optimizer.sparse=sgd", "optimizer.lr=0.5"]
ADAGRAD = ["optimizer.dense=adagrad", "optimizer.sparse=rowwise_adagrad", "optimizer.lr=0.05"]
