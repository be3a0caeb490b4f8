"""DPO through the Python API instead of a recipe: the same objects `mmalign train text/dpo.yaml` builds.

Run: python examples/dpo_text.py   (builds the offline text world on first use, ~3 min on 2 CPU cores)
"""

from mmalign.core.data import read_rows, validate_preference_rows, validate_prompt_rows
from mmalign.evaluation.sequence import SequenceEvaluator
from mmalign.text import CausalLMPolicy
from mmalign.text.policy import LoraSpec
from mmalign.text.rewards import AnswerMatch
from mmalign.train import TrainConfig, Trainer
from mmalign.train.preference import PreferenceAlgorithm, PreferenceConfig
from mmalign.zoo import registry

world = registry.build("text")  # cached after the first call
policy = CausalLMPolicy.from_pretrained(
    str(world / "base"), lora=LoraSpec(r=16, alpha=32), max_length=24, max_new_tokens=5
)
pairs = validate_preference_rows(read_rows(world / "train_pairs.jsonl"))
algorithm = PreferenceAlgorithm(policy, pairs, PreferenceConfig(loss="dpo", beta=0.5))

eval_prompts = validate_prompt_rows(read_rows(world / "eval_prompts.jsonl"))
evaluator = SequenceEvaluator(
    pairs=validate_preference_rows(read_rows(world / "eval_pairs.jsonl")),
    prompts=eval_prompts,
    rewards=[AnswerMatch({r.data["prompt"]: r.data["answer"] for r in eval_prompts})],
)
config = TrainConfig(max_steps=150, batch_size=32, lr=5e-4, warmup_steps=10, scheduler="cosine")
summary = Trainer(policy, algorithm, config, "runs/example-dpo", evaluator=evaluator).train()
print("before:", summary["before"])
print("after: ", summary["after"])
