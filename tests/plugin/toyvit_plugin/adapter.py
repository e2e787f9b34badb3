"""The package's vitdecomp adapter for :class:`toyvit_plugin.model.ToyViT`, written only with the
public kit (``vitdecomp.adapters``); found through the package's entry point."""

from __future__ import annotations

from vitdecomp.adapters import (
    Block,
    Heads,
    Plan,
    Pool,
    Readout,
    Tap,
    TokenNorm,
    Values,
    check_plan_args,
    fused_qkv_values,
    mlp_field,
    token_model_plan,
)


class ToyAdapter:
    family = "toy-vit"
    representations = ("cls",)

    def plan(self, model, *, start_layer: int, representation: str | None, heads: bool) -> Plan:
        rep = check_plan_args(representation, self.representations, start_layer, len(model.blocks))
        blocks = []
        for i, blk in enumerate(model.blocks):
            if i < start_layer:
                continue
            attn = blk.attn
            attention = Heads(
                attn,
                f"blocks.{i}.attn",
                attn.heads,
                attn.proj.weight,
                attn.proj.bias,
                z=Tap(attn.proj, "input"),  # the heads' outputs, concatenated
                probs=Tap(attn.probs),  # for token splits
                values=Values(Tap(attn.qkv), fused_qkv_values(attn.heads)),
            )
            blocks.append(Block(f"blocks.{i}", blk, i, [attention, mlp_field(blk.mlp, f"blocks.{i}.mlp")]))
        readout = Readout(Tap(model.norm, "input"), [TokenNorm(model.norm), Pool(positions=(0,))], Tap(model))
        return token_model_plan(
            self.family,
            model,
            blocks,
            block_modules=model.blocks,
            start_layer=start_layer,
            num_prefix_tokens=1,
            patch=(model.patch_size, model.patch_size),
            image_tap=Tap(model.patch, "input", "nchw"),
            readout=readout,
            meta={"representation": rep, "start_layer": start_layer, "num_blocks": len(model.blocks)},
        )
