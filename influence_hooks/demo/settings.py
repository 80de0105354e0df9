"""The demo's settings and their defaults (light to import: the command line reads them)."""

DEFAULTS = dict(epochs=10, n_train=None, n_val=300, n_queries=150, label_noise=0.1, lr=0.1, hidden=64,
                batch_size=32, projection=1024, query_every_n_steps=4, seed=0)
