"""Fields every config shares; the other config files start from `base_config()` and change what differs.

The curriculum is ctELM's three stages (arXiv 2601.18796), by their task mixtures below:
  1. alignment: reconstruction (`describe`) plus embedding prediction (`embed`);
  2. concept learning: embeddings moved along concept vectors (`offset`: e + a v -> the trial moved in proportion to
     a) beside reconstruction. The word-concept task (`concept`) is left out: on the default budget it helped nothing
     the ablation measures (BENCHMARKS.md, "Ablation of ctELM's recipe"); a mixture may still name it;
  3. fine control: comparisons of several embeddings, questions and the full eligibility criteria, with the first two
     stages' tasks kept in the mix.
"""

import ml_collections

from ctelm_jax.data.tasks import TASKS
from ctelm_jax.parallel.rules import DEFAULT_RULES

ALIGN_TASKS = {"describe": 1.0, "embed": 0.25}
CONCEPT_TASKS = {"describe": 0.4, "offset": 0.4}
CONTROL_TASKS = {"describe": 0.3, "compare": 0.2, "attributes": 0.2, "offset": 0.15, "eligibility": 0.1}


def base_config() -> ml_collections.ConfigDict:
    """Defaults: embedded SmolLM2-135M-Instruct decoder + all-MiniLM-L6-v2 encoder, LoRA on q/k as OpenELM."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        decoder="default",          # 'default' (embedded SmolLM2-135M-Instruct), a Hugging Face Llama folder, or
                                    # 'random': a randomly initialised decoder of shape `arch` (tests, benchmarks)
        tokenizer="",               # '' = the decoder folder's tokenizer; 'default' = the embedded SmolLM2's; a folder
        arch=ml_collections.ConfigDict(),  # LlamaConfig fields: the random decoder's shape, or the shape a pretrained
                                    # folder must have (checked at start; the sizing and AOT tools read it)
        dtype="float32", param_dtype="float32", scan_layers=False, remat_policy="none",
        attention="auto",           # 'auto' (splash on TPU, cudnn on GPU in bf16, else xla), 'xla' (dense mask and
                                    # scores), 'splash' (TPU Pallas kernel), 'cudnn' (models/attention.py); decoding
                                    # with a KV cache always uses xla
        frozen_dtype="float32",     # storage of the groups no stage trains (the frozen base): 'bfloat16' halves it;
                                    # trained groups keep param_dtype masters (train/precision.py)
        lora_rank=16, lora_alpha=32.0, lora_targets=("q_proj", "k_proj"),
        domain_dim=384, adapter_hidden=1024, seed=0,
        standardize_adapter_input=True,  # adapter sees (e - train mean) / train spread; False = OpenELM's raw e
        embed_pred_weight=1.0,      # > 0: an embedding-prediction head (text -> vector, models/embed_head.py) whose
                                    # 1 - cos loss on `embed` examples has this weight; 0 = no head
        tokens_per_embedding=1,     # k soft tokens per embedding (the adapter's output split in k, at k consecutive
                                    # placeholders); 1 = OpenELM's layout
        loss_chunk=0,               # > 0: the token loss computes logits for this many positions of every row at a time
                                    # (train/loss.py: never the whole (B, T, V) float32 logits); 0 = all at once
    ))
    c.data = ml_collections.ConfigDict(dict(
        corpus="data/clinical_trials.jsonl.gz",
        embeddings="",              # '' = embed the corpus with `encoder` into <workdir>/embeddings; 'random' = tests
        encoder="default",          # 'default' (embedded all-MiniLM-L6-v2) or a BERT-family folder
        max_records=0,              # 0 = all
        tasks=TASKS, seq_len=256, global_batch_size=4, max_embeddings_per_row=4, seed=0,
        prefetch=2,                 # training batches built ahead in a background thread while steps run; 0 = off
        embedding_noise=0.0,        # training input embeddings + N(0, (this x the train split's spread)^2) per
                                    # dimension, renormalised (ctELM's smoothness regulariser); 0 = off
    ))
    c.concepts = ml_collections.ConfigDict(dict(
        method="centroid",          # built-in concept vectors: 'centroid' (ctELM's: trials with the attribute minus
                                    # without) or 'edit_pair' (half the mean difference of n_trials training trials
                                    # rendered with the attribute edited each way, embedded; ctelm_jax/run/concepts.py)
        n_trials=200,               # edit_pair: trials per concept (3 x 2 x 200 encoder passes, cached in the workdir)
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.rules = [list(r) for r in DEFAULT_RULES]
    c.stages = [
        dict(name="align", steps=100, trainable=("adapter",), tasks=dict(ALIGN_TASKS), learning_rate=1e-3,
             warmup_steps=10),
        dict(name="concepts", steps=100, trainable=("adapter", "lora"), tasks=dict(CONCEPT_TASKS),
             learning_rate=3e-4, warmup_steps=10),
        dict(name="control", steps=100, trainable=("adapter", "lora"), tasks=dict(CONTROL_TASKS),
             learning_rate=3e-4, warmup_steps=10),
    ]
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=50, keep=2, keep_best=1, async_save=True))
    c.eval = ml_collections.ConfigDict(dict(every_steps=50, batches=4))
    c.export = ml_collections.ConfigDict(dict(every_steps=0, dir="", lora="merge"))
    c.log_every = 1
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="", num_processes=1, process_id=0, local_device_ids=(), initialization_timeout=300))
    return c
