"""Slot layers and the adapter store: FLoRA, LoRA, IA3 and base rows in one forward equal PEFT's own outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel
from safetensors.torch import load_file, save_file

from flora_hf import FLoRAConfig
from serving.adapters.loader import load_adapter_folder
from serving.adapters.store import AdapterStore
from serving.slot_layers import SlotLinear
from serving.step_metadata import AdapterContext, StepMetadata
from serving.types import AdapterError
from tests.models import model_inputs, tiny_gpt_bigcode
from tests.serving.tiny_serving import save_random_adapter


@pytest.fixture()
def adapters(tmp_path):
    base = tiny_gpt_bigcode()
    folders = {
        "flora1": FLoRAConfig(r=1),
        "flora4": FLoRAConfig(r=4, target_modules=["c_attn", "c_fc"]),
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], init_lora_weights=False),
        "ia3": IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
    }
    for name, config in folders.items():
        save_random_adapter(base, config, tmp_path / name)
    return base, tmp_path


def peft_logits(base, folder, inputs) -> torch.Tensor:
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    with torch.no_grad():
        return model(**inputs).logits


def make_store(base, roots, num_slots: int = 8, max_rank: int = 8) -> AdapterStore:
    return AdapterStore(base, AdapterContext(), num_slots=num_slots, max_rank=max_rank, roots=roots)


def test_mixed_adapter_kinds_in_one_forward_match_peft(adapters) -> None:
    base, root = adapters
    reference_base = copy.deepcopy(base)
    store = make_store(base, [root])
    names = ["flora4", "lora", "__base__", "ia3", "flora1"]
    kinds = {"flora1": ("flora", 1), "flora4": ("flora", 4), "lora": ("lora", 4), "ia3": ("ia3", 0)}
    for name in kinds:
        store.register(name, root / name)
    slots = []
    for name in names:
        if name == "__base__":
            slots.append(0)
            continue
        assert store.acquire(name) is None  # cold: loads in the background
        store.wait_loaded(name)
        slots.append(store.acquire(name))
    inputs = model_inputs(base, len(names))
    store.context.current = StepMetadata(slots=torch.tensor(slots), flora_rank=4, lora_rank=4, ia3=True)
    with torch.no_grad():
        got = base(**inputs).logits
    store.context.current = None
    for row, name in enumerate(names):
        row_inputs = {k: v[row : row + 1] for k, v in inputs.items()}
        if name == "__base__":
            with torch.no_grad():
                expected = reference_base(**row_inputs).logits
        else:
            expected = peft_logits(reference_base, root / name, row_inputs)
        torch.testing.assert_close(got[row : row + 1], expected, atol=1e-5, rtol=0, msg=name)
    with torch.no_grad():  # no metadata: the plain base model
        torch.testing.assert_close(base(**inputs).logits, reference_base(**inputs).logits)


def test_lru_eviction_under_more_adapters_than_slots(adapters) -> None:
    base, root = adapters
    store = make_store(base, [root], num_slots=2)
    for name in ("flora1", "flora4", "lora"):
        store.register(name, root / name)

    def resident_slot(name: str) -> int:
        if store.acquire(name) is None:
            store.wait_loaded(name)
        return store.acquire(name)  # pinned once more when it was already resident

    a = resident_slot("flora1")  # pinned by one row
    b = resident_slot("flora4")
    assert {a, b} == {1, 2}
    store.release("flora1")  # flora1 unpinned and least recently used
    c = resident_slot("lora")
    assert c == a and "flora1" not in store.resident() and store.evictions == 1
    assert store.acquire("flora1") is None  # both slots pinned by running rows: the request waits
    assert store.resident().keys() == {"flora4", "lora"}
    store.release("flora4")
    assert resident_slot("flora1") == b  # the least recently used unpinned slot is reused
    assert store.loads == 4
    store.close()


def test_unload_while_pinned_frees_slot_after_release(adapters) -> None:
    base, root = adapters
    store = make_store(base, [root], num_slots=1)
    store.register("lora", root / "lora")
    store.acquire("lora")
    store.wait_loaded("lora")
    assert store.acquire("lora") == 1
    store.unregister("lora")
    assert not store.has("lora") and store.resident() == {} and store._retired == {1: 1}  # one row uses slot 1
    store.release("lora", 1)
    assert store._retired == {} and store._free == [1]
    layer = next(m for m in base.modules() if isinstance(m, SlotLinear) and "lora_a" in m.banks)
    assert layer.banks["lora_a"][1].abs().sum() == 0  # slot back to neutral
    store.close()


def _copy_adapter(src, dst) -> None:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


def test_bad_adapters_are_refused_with_clear_messages(adapters, tmp_path) -> None:
    base, root = adapters
    store = make_store(base, [root])

    corrupt = root / "corrupt"
    _copy_adapter(root / "flora1", corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        store.register("corrupt", corrupt)

    nan = root / "nan"
    _copy_adapter(root / "lora", nan)
    tensors = load_file(nan / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, nan / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="NaN or infinite"):
        store.register("nan", nan)

    other_base = tiny_gpt_bigcode()
    other_base.config.n_embd = 48
    from transformers import GPTBigCodeForCausalLM

    wide = GPTBigCodeForCausalLM(other_base.config)
    save_random_adapter(wide, FLoRAConfig(r=1), root / "mismatched")
    with pytest.raises(AdapterError, match="does not fit the base model"):
        store.register("mismatched", root / "mismatched")

    huge = root / "huge"  # a header that claims terabyte shapes: refused from the header, nothing allocated
    _copy_adapter(root / "flora1", huge)
    data = (huge / "adapter_model.safetensors").read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    for key, entry in header.items():
        if key != "__metadata__":
            entry["shape"], entry["data_offsets"] = [10**6, 10**6], [0, 4 * 10**12]
    packed = json.dumps(header).encode()
    (huge / "adapter_model.safetensors").write_bytes(len(packed).to_bytes(8, "little") + packed + data[8 + size :])
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        store.register("huge", huge)

    binary = root / "binary"
    _copy_adapter(root / "flora1", binary)
    (binary / "adapter_model.safetensors").rename(binary / "adapter_model.bin")
    with pytest.raises(AdapterError, match="only safetensors"):
        store.register("binary", binary)

    unknown = root / "unknown"
    _copy_adapter(root / "flora1", unknown)
    config = json.loads((unknown / "adapter_config.json").read_text())
    (unknown / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "VERA"}))
    with pytest.raises(AdapterError, match="VERA is not served"):
        store.register("unknown", unknown)

    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    _copy_adapter(root / "flora1", outside)
    with pytest.raises(AdapterError, match="outside the allowed adapter roots"):
        store.register("outside", outside)

    with pytest.raises(AdapterError, match="rank 4; this server holds ranks up to 2"):
        load_adapter_folder("big", root / "flora4", base, max_rank=2)
    assert store.names() == []  # nothing half-registered
    store.close()


def test_slot_layer_on_an_8bit_base_uses_the_scaled_call() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    linear = torch.nn.Linear(16, 12)
    q = bnb.nn.Linear8bitLt(16, 12, has_fp16_weights=False, threshold=0.0)
    q.load_state_dict(linear.state_dict())
    layer = SlotLinear(q, AdapterContext(), num_slots=2, max_rank=4)
    f_in, f_out = 1 + 0.3 * torch.randn(2, 16), 1 + 0.3 * torch.randn(2, 12)
    layer.write_slot(2, {"flora_in": f_in, "flora_out": f_out})
    x = torch.randn(2, 3, 16)
    layer.context.current = StepMetadata(slots=torch.tensor([2, 0]), flora_rank=2)
    with torch.no_grad():
        got = layer(x)
        expected = torch.stack([f_out[j] * (q(x[0] * f_in[j]) - q.bias) for j in range(2)]).mean(0) + q.bias
    assert layer.banks["flora_in"].dtype == torch.float16
    torch.testing.assert_close(got[0], expected, atol=2e-2, rtol=0)  # adapters held in fp16 on int8 bases
    torch.testing.assert_close(got[1], q(x[1]), atol=1e-5, rtol=0)


def test_warm_puts_startup_adapters_on_the_device(adapters) -> None:
    base, root = adapters
    store = make_store(base, [root], num_slots=2)
    for name in ("flora1", "lora", "ia3"):
        store.register(name, root / name)
    store.warm(["flora1", "lora", "ia3"])  # more than the slots: the first two
    assert set(store.resident()) == {"flora1", "lora"} and store._pins == {}
    store.close()


def _forward_slots(store: AdapterStore, base, slots: list[int], inputs) -> torch.Tensor:
    store.context.current = StepMetadata(slots=torch.tensor(slots), flora_rank=4, lora_rank=4, ia3=True)
    try:
        with torch.no_grad():
            return base(**inputs).logits
    finally:
        store.context.current = None


@pytest.mark.parametrize(("first", "second"), [("flora4", "flora4-b"), ("lora", "ia3")])
def test_a_name_reloaded_while_in_use_means_the_new_weights(adapters, first: str, second: str) -> None:
    """Unload ``v`` and load another folder as ``v`` while a row still decodes with it: the running row finishes
    on the old weights, every new request gets the new ones, and the old slot is cleared when the row ends."""
    base, root = adapters
    reference = copy.deepcopy(base)
    if second == "flora4-b":
        save_random_adapter(base, FLoRAConfig(r=4, target_modules=["c_attn", "c_fc"]), root / second)
    store = make_store(base, [root], num_slots=2)
    store.register("v", root / first)
    store.acquire("v")
    store.wait_loaded("v")
    old_slot = store.acquire("v")  # a running row holds it
    store.unregister("v")
    store.register("v", root / second)
    assert store.acquire("v") is None  # the new weights need their own slot
    store.wait_loaded("v")
    new_slot = store.acquire("v")
    assert new_slot != old_slot
    inputs = model_inputs(base, 2)
    got = _forward_slots(store, base, [old_slot, new_slot], inputs)
    for row, folder in enumerate((first, second)):
        row_inputs = {k: v[row : row + 1] for k, v in inputs.items()}
        expected = peft_logits(reference, root / folder, row_inputs)
        torch.testing.assert_close(got[row : row + 1], expected, atol=1e-5, rtol=0, msg=folder)
    store.release("v", old_slot)  # the old row finishes: its slot is cleared and free again
    store.release("v", new_slot)
    assert store.resident() == {"v": new_slot} and store._retired == {} and old_slot in store._free
    store.close()


def test_names_and_paths_are_checked_and_loads_under_one_name_are_serialised(adapters) -> None:
    base, root = adapters
    store = make_store(base, [root])
    for bad in ("a/../../b", "../x", "", "a b", "x" * 200, "a/b/c"):
        with pytest.raises(AdapterError, match="invalid adapter name"):
            store.register(bad, root / "flora1")
    for path in ("~nosuchuser-flora/x", f"{root}/fl\0ra1"):
        with pytest.raises(AdapterError, match="invalid adapter path|outside the allowed"):
            store.register("ok", path)
    import threading

    results: list[str] = []
    barrier = threading.Barrier(2)

    def load(folder: str) -> None:
        barrier.wait()
        try:
            store.register("same", root / folder)
            results.append("loaded")
        except AdapterError:
            results.append("refused")

    threads = [threading.Thread(target=load, args=(f,)) for f in ("flora1", "lora")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["loaded", "refused"] and store.names() == ["same"]
    store.register("owner/name", root / "flora1")  # hub-style ids, as TGI's adapter_id usually is
    store.close()


def test_lora_patterns_are_matched_as_peft_matches_them(tmp_path) -> None:
    # "1.attn.c_attn" names layer 1 only: a plain suffix test would also give its alpha (and rank rule) to layer 11
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    base = GPTBigCodeForCausalLM(GPTBigCodeConfig(vocab_size=64, n_positions=16, n_embd=16, n_layer=12, n_head=2))
    config = LoraConfig(
        r=4, lora_alpha=8, alpha_pattern={"1.attn.c_attn": 64}, target_modules=["c_attn"], init_lora_weights=False
    )
    folder = save_random_adapter(base, config, tmp_path / "patterned")
    served = load_adapter_folder("patterned", folder, base, max_rank=8)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), folder)
    for layer in (1, 11):
        path = f"transformer.h.{layer}.attn.c_attn"
        module = peft.get_submodule(f"base_model.model.{path}")
        expected = module.lora_B["default"].weight.t() * module.scaling["default"]
        torch.testing.assert_close(served.modules[path]["lora_b"], expected, msg=path)
    assert peft.get_submodule("base_model.model.transformer.h.11.attn.c_attn").scaling["default"] == 2.0
