"""Exported agents (what the Model Registry holds); the registry itself is checked on a real flow run in
test_priorzero_flow.py::test_three_iterations_complete_with_metrics_per_iteration_in_mlflow."""

import pytest

from priorzero_core.agent_model import export_agent, load_losses, read_agent
from priorzero_core.errors import CheckpointError


def test_an_exported_agent_whose_file_changed_is_refused_in_one_line(tmp_path):
    from priorzero_core.config import load_config
    from priorzero_core.games import game_spec

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "world_model.safetensors").write_bytes(b"weights")
    cfg = load_config("debug", ["llm.enabled=false"])
    agent = export_agent(ckpt, cfg, game_spec(cfg.game), tmp_path / "agent", 4, {"evals/reward_mean": 3.0})
    assert read_agent(agent)[1]["iteration"] == 4 and load_losses(agent) is None  # a checkpoint without counts
    (agent / "world_model.safetensors").write_bytes(b"other")
    with pytest.raises(CheckpointError, match="world_model.safetensors is missing or does not match its hash"):
        read_agent(agent)


def test_an_exported_agent_carries_its_run_s_loss_counts(tmp_path):
    from priorzero_core.checkpoint import CheckpointWriter
    from priorzero_core.config import load_config
    from priorzero_core.games import game_spec
    from priorzero_core.outcomes import LossMemory

    counts = LossMemory({("pabc", "jump"): [3, 2], ("rdef", "jump"): [4, 2]})
    writer = CheckpointWriter(tmp_path / "checkpoints", 1)
    writer.json("losses", counts.to_json())
    (writer.tmp / "world_model.safetensors").write_bytes(b"weights")
    ckpt = writer.commit({})
    cfg = load_config("debug", ["llm.enabled=false"])
    agent = export_agent(ckpt, cfg, game_spec(cfg.game), tmp_path / "agent", 1, {"evals/reward_mean": 3.0})
    assert load_losses(agent).counts == counts.counts and "losses.json.gz" in read_agent(agent)[1]["sha256"]


def test_an_agent_with_a_trained_llm_scores_with_the_trained_weights_when_loaded(tmp_path, tiny_llm_dir):
    import torch
    from safetensors.torch import save_file

    from priorzero_core.agent_model import load_agent
    from priorzero_core.config import load_config
    from priorzero_core.games import game_spec
    from priorzero_core.llm_prior import make_llm_prior
    from priorzero_core.llm_train import LLMTrainer
    from priorzero_core.world_model import WorldModel

    cfg = load_config("debug", [f"llm.model={tiny_llm_dir}", "llm.backend=transformers", "llm.lora.enabled=true",
                                "llm.scoring_dtype=float32"])
    prior = make_llm_prior(cfg.llm)
    trainer = LLMTrainer(prior, cfg.llm)
    torch.manual_seed(1)
    with torch.no_grad():  # stands in for training: adapters that move the scores
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    prior.sync_weights(trainer.model)
    ckpt = tmp_path / "ckpt"
    trainer.save_state(ckpt / "llm")
    save_file(WorldModel(cfg.world_model, input_dim=384).state_dict(), str(ckpt / "world_model.safetensors"))
    agent_dir = export_agent(ckpt, cfg, game_spec(cfg.game), tmp_path / "agent", 2, {"evals/reward_mean": 1.0})

    _, _, agent = load_agent(agent_dir)
    batch = [(prior.build_prompt([], "A kitchen.", ["go north", "look"]), ["go north", "look"])]
    fresh = make_llm_prior(cfg.llm).score(batch)[0]
    assert not torch.allclose(torch.tensor(fresh), torch.tensor(prior.score(batch)[0]), atol=1e-4)
    torch.testing.assert_close(torch.tensor(agent.llm.score(batch)[0]), torch.tensor(prior.score(batch)[0]))
