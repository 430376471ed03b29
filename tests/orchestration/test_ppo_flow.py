"""The priorzero flow with ORZ PPO on: adapt + ppo_train every llm_train_freq iterations, logged to MLflow.

A real Prefect server, a real MLflow store, a real local Ray cluster (policy, critic, reference and reward
actors) and the real embedded game; the LLM is a tiny random Llama with SmolLM2's tokenizer so it takes
seconds, not minutes (tests/ppo/test_learning.py shows PPO learning with SmolLM2 itself).
"""

from priorzero.flows.priorzero_flow import priorzero
from priorzero_core import checkpoint as ckpt

from .test_priorzero_flow import mlflow_run, task_runs

PPO_METRICS = ("train/ppo_policy_loss", "train/ppo_value_loss", "train/ppo_kl", "train/ppo_reward_mean",
               "train/ppo_response_len", "train/ppo_tokens_per_s", "timing/adapt_s", "timing/ppo_train_s")


def test_adapt_and_ppo_train_run_every_llm_train_freq_iterations_and_land_in_mlflow(prefect_api, debug_overrides,
                                                                                    tiny_llm_dir, tmp_path):
    overrides = [
        *debug_overrides, "llm.enabled=true", f"llm.model={tiny_llm_dir}", "eval.modes=[wm]", "eval.eval_freq=4",
        "schedule.llm_train_freq=2", "schedule.mode=sequential", "ppo.use_orz_trainer=true",
        "ppo.rollout_batch_size=3", "ppo.train_batch_size=3", "ppo.n_samples_per_prompt=2",
        "ppo.critic_update_steps=2", "ppo.generate_max_tokens=8", "ppo.max_prompt_tokens=256",
        "ppo.history_length=1", "ppo.think=false", "ppo.actor_num_cpus=0.5",
    ]
    state = priorzero(config="debug", overrides=overrides, iterations=4, return_state=True, run_name="ppo")

    assert state.is_completed(), state.message
    runs = task_runs(state.state_details.flow_run_id)
    for n in (2, 4):
        assert runs[f"adapt-{n}"].state.is_completed() and runs[f"ppo_train-{n}"].state.is_completed()
    assert not {"adapt-1", "adapt-3", "ppo_train-1", "ppo_train-3", "train_llm-2", "train_llm-4"} & set(runs)

    run_dir = tmp_path / "runs" / "ppo"
    assert sorted(p.name for p in (run_dir / "ppo").glob("prompts-*.jsonl")) == ["prompts-000002.jsonl",
                                                                                 "prompts-000004.jsonl"]
    path, manifest = ckpt.latest_valid(run_dir / "checkpoints")
    assert manifest["meta"]["iteration"] == 4 and (path / "ppo").is_dir()  # resume restores the PPO actors too

    client, run = mlflow_run(debug_overrides)
    for key in PPO_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [2, 4], key
    assert client.get_metric_history(run.info.run_id, "train/ppo_response_len")[0].value > 0
