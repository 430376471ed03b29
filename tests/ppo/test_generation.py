import pytest
import torch

from priorzero_core.config import LLMConfig, PPOConfig
from priorzero_core.errors import BackendUnavailable
from priorzero_core.llm_prior import load_tokenizer, resolve_model_dir
from priorzero_core.ppo.generation import PolicyEngine, make_engine, trim_response


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_dir(LLMConfig()))


def test_responses_end_at_the_stop_string_or_eos(tokenizer):
    stop = tokenizer.encode(" north </answer>", add_special_tokens=False)
    ids, finished = trim_response(tokenizer, stop + [tokenizer.eos_token_id] * 3)  # generate pads with EOS
    assert ids == stop and finished
    ids, finished = trim_response(tokenizer, tokenizer.encode(" wait", add_special_tokens=False) + [tokenizer.eos_token_id, 5])
    assert ids[-1] == tokenizer.eos_token_id and finished
    capped = tokenizer.encode(" open the", add_special_tokens=False)
    assert trim_response(tokenizer, capped) == (capped, False)


def test_cpu_default_generates_in_the_policy_actor(tmp_path, tokenizer):
    cfg = PPOConfig(vllm_venv=str(tmp_path / "no-venv"))
    assert isinstance(make_engine(cfg, object(), tmp_path, tokenizer, tmp_path), PolicyEngine)


def test_vllm_asked_for_but_missing_is_a_clear_error(tmp_path, tokenizer):
    cfg = PPOConfig(generation_backend="vllm", vllm_venv=str(tmp_path / "no-venv"))
    with pytest.raises(BackendUnavailable, match="setup_vllm_cpu.sh"):
        make_engine(cfg, object(), tmp_path, tokenizer, tmp_path)


def test_which_engine_generates(tmp_path, monkeypatch):
    import importlib.util

    from priorzero_core.ppo import generation

    none = str(tmp_path / "no-venv")
    assert generation.engine_kind(PPOConfig(vllm_venv=none)) == "transformers"  # a CPU without vLLM
    assert generation.engine_kind(PPOConfig(vllm_venv=none, generation_backend="vllm")) == "server"  # the venv's
    assert generation.engine_kind(PPOConfig(vllm_venv=none, generation_backend="vllm", vllm_engine="actors")) == "actors"
    assert generation.engine_kind(PPOConfig(vllm_url="http://127.0.0.1:1", vllm_engine="actors")) == "server"
    assert generation.engine_kind(PPOConfig(vllm_url="http://127.0.0.1:1", generation_backend="transformers")) \
        == "transformers"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    # vLLM importable here (a cluster's CUDA image): engines as Ray actors, the server only when asked for
    assert generation.engine_kind(PPOConfig(generation_backend="vllm")) == "actors"
    assert generation.engine_kind(PPOConfig(generation_backend="vllm", vllm_engine="server")) == "server"
    monkeypatch.setattr(generation.torch.cuda, "is_available", lambda: True)
    assert generation.engine_kind(PPOConfig()) == "actors"  # auto on CUDA with vLLM installed
    assert generation.engine_kind(PPOConfig(generation_backend="transformers")) == "transformers"


def test_vllm_engine_actors_asked_for_but_missing_is_a_clear_error(tmp_path, tokenizer):
    cfg = PPOConfig(generation_backend="vllm", vllm_engine="actors", vllm_venv=str(tmp_path / "no-venv"))
    with pytest.raises(BackendUnavailable, match="vLLM generation unavailable: vllm is not installed.*setup_vllm_cpu.sh"):
        make_engine(cfg, object(), tmp_path, tokenizer, tmp_path)


def test_a_local_ray_cluster_has_room_for_the_vllm_engine_actors(tmp_path):
    from priorzero_core.config import PriorZeroConfig
    from priorzero_core.ray_cluster import local_cpus

    ppo = dict(algorithm="grpo", n_samples_per_prompt=2, vllm_venv=str(tmp_path / "no-venv"))
    plain = PriorZeroConfig.model_validate({"ppo": ppo})
    engines = PriorZeroConfig.model_validate({"ppo": {**ppo, "generation_backend": "vllm", "vllm_engine": "actors",
                                                      "vllm_num_engines": 2, "actor_num_cpus": 4}})
    assert local_cpus(plain, ppo=True) >= 3  # policy, reference, one reward actor
    assert local_cpus(engines, ppo=True) == (3 + 2) * 4  # and two engines, 4 CPUs each


class FakeWorker:
    """What `_receive_weights` uses of a vLLM worker: its rank, device and `reload_weights`."""

    def __init__(self, fail_after=None):
        self.rank, self.device, self.loaded, self.fail_after = 0, torch.device("cpu"), {}, fail_after

    def reload_weights(self, weights_iterator):
        for name, tensor in weights_iterator:  # as vLLM's load_weights: one tensor at a time, as it arrives
            if len(self.loaded) == self.fail_after:
                raise RuntimeError("load failed")
            self.loaded[name] = tensor


@pytest.mark.parametrize("fail_after", [None, 1])
def test_the_policy_broadcasts_its_weights_to_engine_workers_in_the_engine_s_dtype(fail_after):
    """Rank 0 (the policy's side) and two engine workers (ranks 1, 2) on a gloo group of their own: every worker
    loads every tensor, in bf16 (integer tensors keep their dtype), the model's default process group untouched.
    A worker whose load fails still receives every broadcast, so the sender finishes instead of hanging."""
    from concurrent.futures import ThreadPoolExecutor

    import torch.distributed as dist

    from priorzero_core.ppo.actors import StaticWeights
    from priorzero_core.ppo.strategy import free_port
    from priorzero_core.vllm_actor import _join_weight_group, _receive_weights

    g = torch.Generator().manual_seed(0)
    state = {"a.weight": torch.randn(3, 5, generator=g), "b.bias": torch.randn(7, generator=g),
             "c.index": torch.arange(4)}
    sender = StaticWeights(state)
    workers = [FakeWorker(fail_after), FakeWorker()]
    port = free_port()

    def worker_side(i):
        _join_weight_group(workers[i], "127.0.0.1", port, 3, 1 + i, "gloo", 60)
        _receive_weights(workers[i], metas)

    metas = sender.weight_meta("bfloat16")
    assert metas == [("a.weight", "bfloat16", [3, 5]), ("b.bias", "bfloat16", [7]), ("c.index", "int64", [4])]
    with ThreadPoolExecutor(3) as pool:
        sent = pool.submit(lambda: (sender.join_weight_group("127.0.0.1", port, 3, "gloo", 60),
                                    sender.broadcast_weights("bfloat16"))[1])
        received = [pool.submit(worker_side, i) for i in range(2)]
        assert sent.result(60) == 2 * 15 + 2 * 7 + 8 * 4
        if fail_after is None:
            received[0].result(60)
        else:
            with pytest.raises(RuntimeError, match="load failed"):
                received[0].result(60)
        received[1].result(60)
    for worker in workers[1:] if fail_after is not None else workers:
        assert list(worker.loaded) == list(state)
        for name, tensor in state.items():
            want = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
            assert worker.loaded[name].dtype == want.dtype and torch.equal(worker.loaded[name], want)
    assert not dist.is_initialized()


def test_weights_are_broadcast_unless_nccl_would_put_two_ranks_on_one_gpu():
    from priorzero_core.ppo.generation import weight_sync_mode

    assert weight_sync_mode("auto", "gloo", [], []) == "broadcast"  # the CPU
    assert weight_sync_mode("auto", "nccl", ["0"], ["1", "2"]) == "broadcast"
    assert weight_sync_mode("auto", "nccl", ["0"], ["1", "0"]) == "object_store"  # an engine beside the policy
    assert weight_sync_mode("object_store", "nccl", ["0"], ["1"]) == "object_store"
    with pytest.raises(BackendUnavailable, match="shares GPU 0 with the policy"):
        weight_sync_mode("broadcast", "nccl", ["0"], ["0"])
