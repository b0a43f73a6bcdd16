"""beit_jax.models.teacher + beit_jax.convert.teacher against timm's `VisionTransformer`
(the real package, random weights) in the two teacher layouts VQ-KD distils from: CLIP's
image tower (pre-norm, bias-free patch conv, QuickGELU, eps 1e-5, projection head) and
DINO's ViT (original layout, no head); the scaling layers; the converter's refusals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from timm.models import vision_transformer as timm_vit

from beit_jax.convert import teacher as convert
from beit_jax.models import teacher

LAYOUTS = {
  "clip": dict(
    pre_norm=True,
    norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-5),
    act_layer="quick_gelu",
    num_classes=24,  # the projection (512 for ViT-B/16)
    global_pool="token",
  ),
  "dino": dict(num_classes=0, global_pool="token"),
}


def _timm(kind, seed=0):
  torch.manual_seed(seed)
  model = timm_vit.VisionTransformer(
    img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, **LAYOUTS[kind]
  )
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(torch.randn_like(p) * 0.05)  # zero biases / unit norms matter too
      if "norm" in name and p.ndim == 1:
        p.mul_(1.0 + 0.3 * torch.randn_like(p))
  return model.eval()


def _timm_targets(model, kind, x):
  with torch.no_grad():
    tokens = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    tokens = tokens[:, 1:]
    return (model.head(tokens) if kind == "clip" else tokens).numpy()


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_teacher_equals_timm(kind):
  model = _timm(kind)
  params, kwargs = convert.timm_to_flax(model.state_dict(), kind, num_heads=2)
  assert kwargs == dict(
    kind=kind,
    image_size=32,
    patch_size=8,
    embed_dim=32,
    depth=2,
    num_heads=2,
    mlp_ratio=4.0,
    proj_dim=24 if kind == "clip" else 0,
  )
  x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  ours = teacher.Teacher(**kwargs).apply({"params": params}, jnp.asarray(x))
  want = _timm_targets(model, kind, x)
  assert ours.shape == want.shape == (2, 16, 24 if kind == "clip" else 32)
  np.testing.assert_allclose(np.asarray(ours), want, atol=1e-4)
  n = sum(p.numel() for p in model.parameters())
  assert sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params)) == n


def test_the_other_layout_is_refused():
  clip = _timm("clip")
  with pytest.raises(ValueError, match="not a dino teacher's layout"):
    convert.timm_to_flax(clip.state_dict(), "dino", num_heads=2)
  with pytest.raises(ValueError, match="Unknown teacher kind 'siglip'"):
    convert.timm_to_flax(clip.state_dict(), "siglip", num_heads=2)
  with pytest.raises(ValueError, match="no 'pos_embed'"):
    sd = {k: v for k, v in clip.state_dict().items() if k != "pos_embed"}
    convert.timm_to_flax(sd, "clip", num_heads=2)


def test_scale_images_is_unilms_scaling_layer():
  x = np.array([[[[-1.0, 0.0, 1.0]]], [[[1.5, -2.0, 0.5]]]], np.float32)  # (2, 1, 1, 3)
  for kind, (mean, std) in {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "dino": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
  }.items():
    want = (np.clip((x + 1.0) * 127.5, 0, 255) / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(
      np.asarray(teacher.scale_images(jnp.asarray(x), kind)), want, rtol=1e-6
    )
