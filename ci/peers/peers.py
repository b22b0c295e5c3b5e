#!/usr/bin/env python3
"""PyTorch peers of `dbrx bench --synthetic dbrx`, timed on the same GPU in the same run.

Rows carry the same names as the bench's rows so ci/peers/table.py can line them up:
  attention prefill/decode  torch SDPA with the cuDNN and the flash backends (48/8 heads of 128)
  MoE layer T=...           a DBRX MoE layer (16 experts of 10752, top-4) with torch._grouped_mm
  prefill / decode step     HF transformers DbrxForCausalLM, full width, N layers, bf16, SDPA
Usage: peers.py --json OUT [--layers 2] [--quick] [--only sdpa,moe,hf]
"""
import argparse
import json
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROWS = []


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def emit(name, peer, ms, note=""):
    ROWS.append({"name": name, "peer": peer, "ms": ms, "note": note})
    print(f"{name:44s} {peer:28s} {'' if ms is None else f'{ms:10.4f} ms'} {note}", flush=True)


def sdpa(quick):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    H, KV, hd = 48, 8, 128
    dev, dt = "cuda", torch.bfloat16
    cases = [("attention decode B=1 ctx=4096", 1, 1, 4096, False),
             ("attention decode B=1 ctx=32768", 1, 1, 32768, False),
             ("attention decode B=64 ctx=8192", 64, 1, 8192, False),
             ("attention prefill causal S=4096", 1, 4096, 4096, True)]
    if not quick:
        cases.append(("attention prefill causal S=16384", 1, 16384, 16384, True))
    for label, backend in (("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION), ("SDPA flash", SDPBackend.FLASH_ATTENTION)):
        for name, B, S, ctx, causal in cases:
            q = torch.randn(B, H, S, hd, device=dev, dtype=dt)
            k = torch.randn(B, KV, ctx, hd, device=dev, dtype=dt)
            v = torch.randn(B, KV, ctx, hd, device=dev, dtype=dt)
            iters = 5 if S > 1 else 50
            try:
                with sdpa_kernel(backend):
                    ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True), 2, iters)
                emit(name, label, ms, "GQA via enable_gqa")
            except RuntimeError as e:
                # Some backends refuse enable_gqa: give them K/V expanded to 48 heads (not timed).
                try:
                    ke, ve = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
                    with sdpa_kernel(backend):
                        ms = timed(lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=causal), 2, iters)
                    emit(name, label, ms, "K/V pre-expanded to 48 heads")
                except RuntimeError as e2:
                    emit(name, label, None, "unavailable: " + str(e2).splitlines()[0][:80])
            del q, k, v
    torch.cuda.empty_cache()


def moe(quick):
    d, Fh, E, k = 6144, 10752, 16, 4
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    router = (torch.rand(E, d, device=dev, generator=g, dtype=torch.float32) - 0.5).to(dt)
    w13 = ((torch.rand(E, 2 * Fh, d, device=dev, generator=g, dtype=torch.float32) - 0.5) * 0.0256).to(dt)
    w2t = ((torch.rand(E, d, Fh, device=dev, generator=g, dtype=torch.float32) - 0.5) * 0.0192).to(dt)  # [E][d][F]

    def layer(x):
        logits = (x @ router.t()).float()
        p = torch.softmax(logits, -1)
        tw, te = p.topk(k, -1)
        tw = tw / tw.sum(-1, keepdim=True)
        flat = te.flatten()
        order = flat.argsort(stable=True)
        tok = order // k
        counts = torch.bincount(flat, minlength=E)
        offs = counts.cumsum(0).to(torch.int32)
        gu = torch._grouped_mm(x[tok], w13.transpose(-2, -1), offs=offs)
        h = F.silu(gu[:, :Fh]) * gu[:, Fh:]
        y = torch._grouped_mm(h, w2t.transpose(-2, -1), offs=offs)
        y = y * tw.flatten()[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, tok, y)

    for T in (1, 4, 8, 16, 64, 512, 4096):
        if quick and T > 512:
            continue
        x = torch.rand(T, d, device=dev, dtype=torch.float32, generator=g).mul_(2).sub_(1).to(dt)
        try:
            ms = timed(lambda: layer(x), 3, 50 if T <= 64 else 10)
            emit(f"MoE layer T={T}", "torch._grouped_mm", ms)
        except RuntimeError as e:
            emit(f"MoE layer T={T}", "torch._grouped_mm", None, "failed: " + str(e).splitlines()[0][:80])
    del router, w13, w2t
    torch.cuda.empty_cache()


def hf(layers, quick):
    from transformers import DbrxConfig, DbrxForCausalLM
    cfg = DbrxConfig(d_model=6144, n_heads=48, n_layers=layers, max_seq_len=4096, vocab_size=100352,
                     attn_config={"kv_n_heads": 8, "clip_qkv": 8.0, "rope_theta": 500000.0},
                     ffn_config={"ffn_hidden_size": 10752, "moe_num_experts": 16, "moe_top_k": 4,
                                 "moe_normalize_expert_weights": 1.0})
    # transformers 5.17 ignores attn_config.rope_theta (uses 10000): set the real base explicitly.
    cfg.rope_parameters = {"rope_theta": 500000.0, "rope_type": "default"}
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.time()
    with torch.device("cuda"):
        model = DbrxForCausalLM(cfg)
    model.eval()
    torch.set_default_dtype(torch.float32)
    print(f"HF DbrxForCausalLM with {layers} layers built in {time.time() - t0:.1f} s", flush=True)
    V = cfg.vocab_size
    label = "HF DbrxForCausalLM sdpa"
    with torch.inference_mode():
        T = 512 if quick else 2048
        ids = torch.randint(0, V, (1, T), device="cuda")
        ms = timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), 1, 3)
        emit(f"prefill {T} tokens, {layers} layers", label, ms)
        ctx0, steps = 1024, 5 if quick else 20
        for B in (1, 8, 64):
            ids = torch.randint(0, V, (B, ctx0), device="cuda")
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            pkv = out.past_key_values
            nxt = torch.randint(0, V, (B, 1), device="cuda")

            def step():
                nonlocal pkv
                o = model(input_ids=nxt, past_key_values=pkv, use_cache=True)
                pkv = o.past_key_values
                o.logits.float().cpu()  # the logits reach the host, as ours do

            ms = timed(step, 2, steps)
            emit(f"decode step B={B} ctx={ctx0}, {layers} layers", label, ms)
            del pkv, out
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="sdpa,moe,hf")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    for part in a.only.split(","):
        try:
            {"sdpa": lambda: sdpa(a.quick), "moe": lambda: moe(a.quick), "hf": lambda: hf(a.layers, a.quick)}[part]()
        except Exception:  # one failing peer must not hide the others
            traceback.print_exc()
            emit(f"peer group {part}", "failed", None, "see log")
        torch.cuda.empty_cache()
    with open(a.json, "w") as f:
        json.dump({"torch": torch.__version__, "rows": ROWS}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
