"""kit/parallel without processes: the Mapping's checks and how every weight is split."""

from __future__ import annotations

import dataclasses
import functools
import gc
import threading
import warnings
import weakref

import pytest
import torch

from kit.config import ModelConfig
from kit.loader import LoadedModel, ModelLoader, random_weights
from kit.network import Network, NetworkBuilder
from kit.parallel import Mapping, check_parallel_sizes, shard_network, sharding_frame
from kit.parallel.comm import TensorParallelComm
from kit.parallel.tp_backend import PARTIAL_SUMS_ENV, PartialSumLinear, TensorParallelBackend
from kit.parallel.protocol import message_capacity, pack_batch, unpack_batch
from kit.parallel.sharding import shard_tensor, split_of
from kit.batch import ForwardBatch, SequenceInput
from kit.backends.torch_backend import DenseLinear, TorchBackend
from kit.builder import BuildConfig
from kit.engine import Engine
from kit.quantization import QuantConfig, Quantizer
from kit.quantization.int4 import dequantize_weight as int4_dequantize

CFG = ModelConfig(family="llama", vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def test_mapping_refuses_bad_sizes_by_name():
    with pytest.raises(ValueError, match="pp_size=2: pipeline parallelism is not supported"):
        Mapping(world_size=2, tp_size=1, pp_size=2)
    with pytest.raises(ValueError, match="world_size"):
        Mapping(world_size=3, tp_size=2)
    with pytest.raises(ValueError, match="Mapping.rank"):
        Mapping.tensor_parallel(2, rank=2)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide num_attention_heads=4"):
        Mapping.tensor_parallel(3).check_model(CFG)
    with pytest.raises(ValueError, match="tensor_parallel_size=4 and num_key_value_heads=3: one must divide"):
        Mapping.tensor_parallel(4).check_model(dataclasses.replace(CFG, num_attention_heads=12,
                                                                   num_key_value_heads=3, intermediate_size=132))


def test_check_parallel_sizes_before_anything_starts(monkeypatch):
    with pytest.raises(ValueError, match="pipeline_parallel_size=2"):
        check_parallel_sizes(2, 2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1, got 0"):
        check_parallel_sizes(0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="tensor_parallel_size=4 needs 4 GPUs, this machine has 2"):
        check_parallel_sizes(4, 1, "cuda")
    check_parallel_sizes(2, 1, "cuda")


def test_heads_kv_heads_and_vocab_ranges():
    m = [Mapping.tensor_parallel(4, r) for r in range(4)]
    assert [list(x.heads(CFG)) for x in m] == [[0], [1], [2], [3]]
    # 2 KV heads over 4 ranks: replicated, each rank keeps the head its query head reads (q h -> kv h // 2)
    assert [list(x.kv_heads(CFG)) for x in m] == [[0], [0], [1], [1]]
    assert [list(Mapping.tensor_parallel(2, r).kv_heads(CFG)) for r in range(2)] == [[0], [1]]
    assert [(r.start, r.stop) for r in (x.vocab_range(211) for x in m)] == [(0, 53), (53, 106), (106, 159), (159, 212)]


def test_float_shards_put_back_together_are_the_weights():
    w = {"model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64),
         "model.layers.0.self_attn.o_proj.weight": torch.randn(64, 64),
         "model.layers.0.mlp.down_proj.weight": torch.randn(64, 128),
         "model.layers.0.mlp.up_proj.bias": torch.randn(128),
         "model.layers.0.self_attn.o_proj.bias": torch.randn(64),
         "model.embed_tokens.weight": torch.randn(211, 64),
         "model.layers.0.input_layernorm.weight": torch.randn(64)}
    parts = {n: [shard_tensor(n, t, CFG, Mapping.tensor_parallel(2, r)) for r in range(2)] for n, t in w.items()}
    assert torch.equal(torch.cat(parts["model.layers.0.self_attn.q_proj.weight"], 0), w["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(torch.cat(parts["model.layers.0.self_attn.o_proj.weight"], 1), w["model.layers.0.self_attn.o_proj.weight"])
    assert torch.equal(torch.cat(parts["model.layers.0.mlp.down_proj.weight"], 1), w["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(torch.cat(parts["model.layers.0.mlp.up_proj.bias"], 0), w["model.layers.0.mlp.up_proj.bias"])
    ob = parts["model.layers.0.self_attn.o_proj.bias"]  # row-parallel bias: added once, by rank 0
    assert torch.equal(ob[0], w["model.layers.0.self_attn.o_proj.bias"]) and not ob[1].any()
    emb = parts["model.embed_tokens.weight"]
    assert [tuple(p.shape) for p in emb] == [(106, 64), (106, 64)]  # 211 rows padded to 212
    assert torch.equal(torch.cat(emb)[:211], w["model.embed_tokens.weight"]) and not emb[1][-1].any()
    assert all(p is w["model.layers.0.input_layernorm.weight"] for p in parts["model.layers.0.input_layernorm.weight"])
    assert [split_of(n) for n in ("lm_head.qweight", "model.layers.3.mlp.gate_proj.weight_scale",
                                  "model.layers.3.mlp.down_proj.qweight", "model.norm.weight")] == \
        ["vocab", "column", "row", "replicated"]


@pytest.fixture(scope="module")
def tiny_loaded(tmp_path_factory):
    from helpers import make_hf_checkpoint
    path = tmp_path_factory.mktemp("tiny_llama")
    make_hf_checkpoint("llama", path)
    return ModelLoader(str(path), dtype=torch.float32).load()


def _dequantized_rows(weights, prefix, qc):
    if f"{prefix}.weight" in weights:
        return weights[f"{prefix}.weight"].float()
    q, s = weights[f"{prefix}.qweight"], weights[f"{prefix}.weight_scale"]
    if q.dtype == torch.int8:
        return q.float() * s.float()[:, None]
    if q.dtype == torch.uint8:
        return int4_dequantize(q, s, weights.get(f"{prefix}.weight_zero"), qc.group_size)
    return q.float() * s.float()  # fp8 per tensor


@pytest.mark.parametrize("preset,group_size", [("int8_wo", None), ("int4_wo", 16), ("fp8", None)])
def test_quantized_shards_dequantize_to_the_slices_of_the_weight(preset, group_size):
    qc = QuantConfig.from_name(preset)
    if group_size:
        qc = dataclasses.replace(qc, group_size=group_size)
    # CFG: o_proj reads 64 inputs, down 128: 2 ranks take 32 / 64 each, whole groups of 16
    loaded = Quantizer(qc).quantize(LoadedModel(CFG, random_weights(CFG, seed=0), name="cfg"))
    net = NetworkBuilder(loaded).build()
    shards = [shard_network(net, Mapping.tensor_parallel(2, r)) for r in range(2)]
    for prefix, dim in (("model.layers.0.self_attn.q_proj", 0), ("model.layers.0.mlp.gate_proj", 0),
                        ("model.layers.0.self_attn.o_proj", 1), ("model.layers.0.mlp.down_proj", 1)):
        full = _dequantized_rows(net.weights, prefix, qc)
        got = torch.cat([_dequantized_rows(s.weights, prefix, qc) for s in shards], dim)
        assert torch.equal(got, full), prefix
    assert shards[0].config.num_attention_heads == 2 and shards[0].config.intermediate_size == 64


def test_int4_group_that_straddles_ranks_is_refused(tiny_loaded):
    qc = dataclasses.replace(QuantConfig.from_name("int4_wo"), group_size=16)
    net = NetworkBuilder(Quantizer(qc).quantize(tiny_loaded)).build()
    # down_proj reads 112 inputs: 2 ranks take 56 each, not a multiple of the 16-wide groups
    with pytest.raises(ValueError, match=r"down_proj.*\[0, 56\).*group_size that divides 56"):
        shard_network(net, Mapping.tensor_parallel(2, 0))


def test_sharding_frame_counts_every_byte_once_per_split(tiny_loaded):
    net = NetworkBuilder(tiny_loaded).build()
    df = sharding_frame(net, 2)
    assert set(df["rank"]) == {0, 1} and len(df) == 2 * len(net.weights)
    col = df[(df.split == "column") & (df.rank == 0)]
    assert all(s[0] * 2 == f[0] for s, f in zip(col.shard_shape, col.full_shape))
    rep = df[df.split == "replicated"]
    assert all(s == f for s, f in zip(rep.shard_shape, rep.full_shape))


def test_step_message_round_trip():
    b = ForwardBatch.build([SequenceInput([5, 6, 7], 0, [0, 2]), SequenceInput([9], 20, [1, 3], logits="all")], 16)
    head, payload = pack_batch(b)
    back = unpack_batch([1, 7] + head, torch.cat([payload, torch.zeros(5, dtype=torch.long)]))
    for f in ("input_ids", "positions", "query_start_loc", "seq_lens", "block_tables", "slot_mapping",
              "logits_indices"):
        assert torch.equal(getattr(back, f), getattr(b, f)), f
        assert getattr(back, f).data_ptr() % 16 == 0, f  # aligned like rank 0's views (Triton specializes on it)
    assert (back.max_query_len, back.max_seq_len, back.block_size) == (3, 21, 16)
    assert payload.numel() <= message_capacity(BuildConfig(max_batch_size=2, max_num_tokens=4, max_seq_len=32,
                                                           max_input_len=32))


def test_tp_engine_directory_holds_one_file_per_rank_and_a_key_with_the_mapping(tiny_loaded, tmp_path):
    from kit.cache_entry import CacheEntryError
    from kit.parallel.engine_files import load_rank_weights, read_tp_config, save_tp_engine, tp_build_key

    net = NetworkBuilder(tiny_loaded).build()
    bc = BuildConfig(max_batch_size=2, max_seq_len=64, max_input_len=32, max_num_tokens=64)
    path = save_tp_engine(net, 2, tmp_path / "tp2", build_config=bc, build_key="k" * 64, dtype=torch.float32)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "manifest.json", "rank0.safetensors",
                                                      "rank1.safetensors"]
    cfg = read_tp_config(path, 2)["_parsed"]
    assert cfg["shard_config"].num_attention_heads == 2 and cfg["model_config"].num_attention_heads == 4
    w1 = load_rank_weights(path, 1, torch.device("cpu"))
    want = shard_network(net, Mapping.tensor_parallel(2, 1)).weights
    assert set(w1) == set(want) and all(torch.equal(w1[k], want[k]) for k in want)
    assert tp_build_key("k" * 64, Mapping.tensor_parallel(2)) != tp_build_key("k" * 64, Mapping.tensor_parallel(4))
    with pytest.raises(ValueError, match="split for tensor_parallel_size=2, asked for 4"):
        read_tp_config(path, 4)
    text = (path / "config.json").read_text().replace('"tp_size": 2', '"tp_size": 1', 1)
    (path / "config.json").write_text(text.replace('"world_size": 2', '"world_size": 1', 1))
    with pytest.raises(CacheEntryError, match="altered"):
        read_tp_config(path)


def _live_tensor_bytes() -> int:
    """The bytes of every CPU storage that a live tensor holds, each storage once."""
    gc.collect()
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NOTE: isinstance() on deprecated torch module attributes warns
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                s = obj.untyped_storage()
                out[s.data_ptr()] = s.nbytes()
    return sum(out.values())


def test_rank_backend_holds_qkv_and_gate_up_once(tiny_loaded):
    """A rank's backend concatenates q/k/v and gate/up; the shard's parts become views of the concatenation,
    so building it adds no second copy of them (the rank's memory stays ~ its shard once)."""
    mapping = Mapping.tensor_parallel(2, 1)
    full = NetworkBuilder(tiny_loaded).build()
    shard = shard_network(full, mapping)
    # the rank's private copy, as it arrives from rank 0 (or from its engine file)
    own = Network(shard.config, shard.layers, {n: t.clone() for n, t in shard.weights.items()}, name=shard.name)
    del full, shard
    fused_names = [n for n in own.weights if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                         "gate_proj.weight", "up_proj.weight"))]
    fused_bytes = sum(own.weights[n].nbytes for n in fused_names)
    assert fused_bytes > 0
    shard_bytes = own.weight_bytes
    parts = [weakref.ref(own.weights[n]) for n in fused_names]
    before = _live_tensor_bytes()
    backend = TensorParallelBackend(own, mapping, TensorParallelComm(1, 2, "cpu"),
                                   tiny_loaded.config.vocab_size)
    grown = _live_tensor_bytes() - before
    # the concatenations replaced their parts (now freed): what the build added is tiny (RoPE's table),
    # where a second copy of q/k/v and gate/up would add `fused_bytes`
    assert all(p() is None for p in parts)
    assert 0 <= grown < 4096 < fused_bytes
    assert own.weight_bytes == shard_bytes  # the network still names every part, with its shape
    layer = next(l for l in own.layers if l.kind == "qkv_proj")
    attn = layer.weights[0].rsplit(".", 2)[0]
    qkv = backend.ops[own.layers.index(layer)][1]
    ptrs = {own.weights[f"{attn}.{m}.weight"].untyped_storage().data_ptr() for m in ("q_proj", "k_proj", "v_proj")}
    assert len(ptrs) == 1  # q, k and v live in one tensor
    x = torch.randn(3, own.config.hidden_size)
    env = {"x": x}
    qkv(env, None, None)
    want = torch.cat([x @ own.weights[f"{attn}.{m}.weight"].T for m in ("q_proj", "k_proj", "v_proj")], -1)
    got = torch.cat([env[k].reshape(3, -1) for k in ("q", "k", "v")], -1)
    torch.testing.assert_close(got, want)


class _ThreadComm:
    """The collectives of `TensorParallelComm` between threads of one process (a barrier and a shared list):
    two rank backends run one step together, and every all-reduce is recorded with its layer."""

    def __init__(self, rank: int, world: int, shared: dict) -> None:
        self.rank, self.world_size, self.backend, self.full_vocab_size = rank, world, "threads", None
        self.shared = shared

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.shared["parts"][self.rank] = t.clone()
        self.shared["barrier"].wait()
        parts = list(self.shared["parts"])
        self.shared["barrier"].wait()
        return parts

    def all_reduce(self, t: torch.Tensor, layer: str = "") -> torch.Tensor:
        if self.rank == 0:
            self.shared["all_reduces"].append(layer)
            self.shared["dtypes"][layer] = t.dtype
        t.copy_(torch.stack(self._exchange(t)).sum(0))
        return t

    def gather_logits(self, logits: torch.Tensor, layer: str = "lm_head") -> torch.Tensor:
        full = torch.cat(self._exchange(logits), dim=-1)
        return full[:, :self.full_vocab_size]


def test_bf16_partial_sums_reduced_in_float32_round_like_one_gemm():
    """A row-parallel GEMM split K-wise over ranks: float32 partial sums, summed, then rounded once to bf16
    equal TP=1's one GEMM almost everywhere (only the float32 summation order differs); bf16 partials, each
    rounded before a bf16 sum, move about half of the outputs by an ulp."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1024, generator=g).bfloat16()
    w = (torch.randn(256, 1024, generator=g) * 0.03).bfloat16()
    one = torch.nn.functional.linear(x, w)  # TP=1
    for tp in (2, 4):
        k = 1024 // tp
        parts = [PartialSumLinear(DenseLinear([w[:, r * k:(r + 1) * k]])) for r in range(tp)]
        outs = [p(x[:, r * k:(r + 1) * k]) for r, p in enumerate(parts)]
        assert all(o.dtype == torch.float32 for o in outs) and parts[0].out_features == 256
        wide = torch.stack(outs).sum(0).bfloat16()
        narrow = torch.stack([o.bfloat16() for o in outs])
        narrow = functools.reduce(torch.add, narrow)  # a bf16 all-reduce: rounded after every add
        same_wide, same_narrow = (wide == one).float().mean().item(), (narrow == one).float().mean().item()
        assert same_wide > 0.999 and same_narrow < 0.8, (tp, same_wide, same_narrow)


@pytest.mark.gpu
def test_partial_sums_on_cuda_are_one_gemm_with_a_float32_output():
    """On CUDA a PartialSumLinear is one GEMM writing float32 (torch.mm's out_dtype): it equals the float32
    product of the bf16 operands to float32 rounding, also for a strided slice of a larger activation."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2560, generator=g).bfloat16().cuda()[:, 256:2304]  # a strided (column) slice
    w = (torch.randn(512, 2048, generator=g) * 0.02).bfloat16().cuda()
    y = PartialSumLinear(DenseLinear([w]))(x)
    assert y.dtype == torch.float32 and y.shape == (64, 512)
    torch.testing.assert_close(y, x.float() @ w.float().T, atol=1e-4, rtol=1e-4)


def test_partial_sums_setting_is_checked_by_name(tiny_loaded, monkeypatch):
    monkeypatch.setenv(PARTIAL_SUMS_ENV, "fp16")
    mapping = Mapping.tensor_parallel(2, 0)
    shard = shard_network(NetworkBuilder(tiny_loaded).build(), mapping)
    with pytest.raises(ValueError, match="KIT_TP_PARTIAL_SUMS must be 'float32' or 'model', got 'fp16'"):
        TensorParallelBackend(shard, mapping, TensorParallelComm(0, 2, "cpu"), tiny_loaded.config.vocab_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("partial_sums", ["float32", "model"])
def test_fused_row_parallel_layers_all_reduce_their_delta_once(tiny_loaded, dtype, partial_sums, monkeypatch):
    """Fused, a row-parallel o_proj / mlp is its GEMM and one all-reduce of the partial `delta` (the next
    norm adds it to the residual): two rank backends in threads give TP=1's logits, with two all-reduces a
    block and one for the embedding. A bf16 model all-reduces float32 partial sums (unless
    KIT_TP_PARTIAL_SUMS=model)."""
    monkeypatch.setenv(PARTIAL_SUMS_ENV, partial_sums)
    loaded = tiny_loaded if dtype == torch.float32 else dataclasses.replace(
        tiny_loaded, weights={n: t.to(dtype) for n, t in tiny_loaded.weights.items()})
    full = NetworkBuilder(loaded).build()
    cfg = full.config
    # NOTE: a barrier with a timeout and daemon threads: a rank that fails breaks the barrier for the other
    # one, and the test fails with the rank's error instead of hanging
    shared = {"parts": [None, None], "barrier": threading.Barrier(2, timeout=60), "all_reduces": [], "dtypes": {}}
    backends = [TensorParallelBackend(shard_network(full, Mapping.tensor_parallel(2, r)), Mapping.tensor_parallel(2, r),
                                      _ThreadComm(r, 2, shared), cfg.vocab_size) for r in range(2)]
    assert all(b.defer_residual for b in backends)
    row_parallel = [fn.__name__ for layer, fn in backends[0].ops if layer.kind in ("o_proj", "mlp")]
    assert row_parallel and set(row_parallel) == {"row_parallel_delta"}  # GEMM, all-reduce, nothing else
    seq = [5, 6, 7, 8, 9, 10, 11]
    batch = ForwardBatch.build([SequenceInput(seq, 0, [0, 1], logits="all")], 4)
    engines = [Engine(b.network, b) for b in backends]
    kvs = [e.allocate_kv_cache(3, 4) for e in engines]
    out: list = [None, None]
    errors: list = []

    def run(r: int) -> None:
        try:
            out[r] = engines[r].forward(batch, kvs[r])
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append((r, e))
            shared["barrier"].abort()

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    ref_engine = Engine(full, TorchBackend(full))
    ref = ref_engine.forward(batch, ref_engine.allocate_kv_cache(3, 4))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(out[0].float(), ref.float(), **tol)
    blocks = sum(1 for l in full.layers if l.kind == "mlp")
    assert len(shared["all_reduces"]) == 2 * blocks + 1
    kinds = {l.name: l.kind for l in full.layers}
    assert sorted({kinds[n] for n in shared["all_reduces"]}) == ["embedding", "mlp", "o_proj"]
    wide = dtype == torch.bfloat16 and partial_sums == "float32"
    for name, reduced in shared["dtypes"].items():  # the embedding's sum is exact: it stays in the model's dtype
        assert reduced == (torch.float32 if wide and kinds[name] != "embedding" else dtype), (name, reduced)
    assert any(isinstance(fn, PartialSumLinear) for fn in _linears(backends[0])) == wide


def _linears(backend):
    """Every linear object the backend's layer functions hold (closures)."""
    found = []
    for _, fn in backend.ops:
        for cell in getattr(fn, "__closure__", None) or ():
            v = cell.cell_contents
            if callable(v) and getattr(v, "__closure__", None):
                found += [c.cell_contents for c in v.__closure__ or ()]
            found.append(v)
    return found
