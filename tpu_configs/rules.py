"""Building blocks for the rules tables of the presets (each preset states its own table)."""

# Fully-sharded data parallel with optional tensor parallelism (MaxText's default strategy):
# parameters split along `embed` over fsdp and along the wide dims over tensor; batch over data+fsdp.
FSDP_TENSOR_RULES = (
    # --- activations ---
    ('batch', ('data', 'fsdp')),
    ('act_seq', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    # --- parameters ---
    ('layers', None),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('norm', None),
)

# Data parallel only: every parameter replicated, the batch split over `data`. On a small CPU the
# fastest layout for small models (the quickstart's LVM): sharded parameters cost gathers and
# scatters between devices that share the same two cores and buy no memory the model needs.
DATA_PARALLEL_RULES = tuple((name, 'data' if name == 'batch' else None) for name, _ in FSDP_TENSOR_RULES)
