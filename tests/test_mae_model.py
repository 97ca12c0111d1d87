"""Fast checks of the masked-autoencoder model on tiny sizes."""

import math

import numpy as np
import pytest
import torch

from tasks.mae import MaskedAutoencoder, get_2d_sincos_pos_embed

IMG, PATCH, CHANS = 16, 4, 3
L = (IMG // PATCH) ** 2
PATCH_DIM = PATCH * PATCH * CHANS


def make_model(**overrides) -> MaskedAutoencoder:
    torch.manual_seed(0)
    kwargs = dict(
        img_size=IMG, patch_size=PATCH, in_chans=CHANS, embed_dim=32, depth=1, num_heads=2,
        decoder_dim=16, decoder_depth=1, decoder_heads=2,
    )
    kwargs.update(overrides)
    return MaskedAutoencoder(**kwargs)


def make_imgs(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, CHANS, IMG, IMG, generator=torch.Generator().manual_seed(1))


def test_sincos_pos_embed_shape():
    emb = get_2d_sincos_pos_embed(32, 4, cls_token=True)
    assert emb.shape == (1 + 16, 32)
    assert np.all(emb[0] == 0)
    assert get_2d_sincos_pos_embed(32, 4).shape == (16, 32)
    with pytest.raises(ValueError):
        get_2d_sincos_pos_embed(30, 4)


def test_output_shapes():
    model = make_model()
    imgs = make_imgs()
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    assert loss.shape == ()
    assert torch.isfinite(loss)
    assert pred.shape == (2, L, PATCH_DIM)
    assert mask.shape == (2, L)
    assert model.forward_features(imgs).shape == (2, 32)


def test_pos_embeds_are_not_trainable():
    model = make_model()
    names = {n for n, _ in model.named_parameters()}
    assert "pos_embed" not in names and "decoder_pos_embed" not in names
    assert "pos_embed" in model.state_dict()


def test_patchify_unpatchify_round_trip_exact():
    model = make_model()
    imgs = make_imgs()
    patches = model.patchify(imgs)
    assert patches.shape == (2, L, PATCH_DIM)
    assert torch.equal(model.unpatchify(patches), imgs)
    assert torch.equal(model.patchify(model.unpatchify(patches)), patches)
    # first patch is the top-left p x p block, pixels ordered (p, p, C)
    assert torch.equal(patches[:, 0], imgs[:, :, :PATCH, :PATCH].permute(0, 2, 3, 1).reshape(2, -1))


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_random_masking_keeps_expected_count(ratio):
    model = make_model()
    # token value = its index, so kept tokens can be traced back to positions
    x = torch.arange(L, dtype=torch.float32).view(1, L, 1).repeat(3, 1, 4)
    x_masked, mask, ids_restore = model.random_masking(x, ratio)
    keep = round(L * (1 - ratio))
    assert x_masked.shape == (3, keep, 4)
    assert torch.all((mask == 0).sum(dim=1) == keep)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for b in range(3):
        kept_positions = sorted(x_masked[b, :, 0].long().tolist())
        assert kept_positions == torch.nonzero(mask[b] == 0).flatten().tolist()
        assert sorted(ids_restore[b].tolist()) == list(range(L))


def test_same_generator_seed_gives_same_mask():
    model = make_model()
    imgs = make_imgs()
    _, _, mask_a = model(imgs, 0.75, generator=torch.Generator().manual_seed(123))
    _, _, mask_b = model(imgs, 0.75, generator=torch.Generator().manual_seed(123))
    _, _, mask_c = model(imgs, 0.75, generator=torch.Generator().manual_seed(124))
    assert torch.equal(mask_a, mask_b)
    assert not torch.equal(mask_a, mask_c)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_ignores_visible_patches(norm_pix_loss):
    model = make_model(norm_pix_loss=norm_pix_loss)
    imgs = make_imgs()
    pred = torch.randn(2, L, PATCH_DIM)
    mask = torch.zeros(2, L)
    mask[:, ::3] = 1  # handcrafted: every third patch masked
    visible = (mask == 0).unsqueeze(-1)  # (B, L, 1)

    base = model.forward_loss(imgs, pred, mask)

    # new target on visible patches only
    target = model.patchify(imgs)
    other_imgs = model.unpatchify(torch.where(visible, target + 5.0 * torch.randn_like(target), target))
    assert not torch.equal(other_imgs, imgs)
    assert torch.allclose(model.forward_loss(other_imgs, pred, mask), base)

    # new prediction on visible patches only
    other_pred = torch.where(visible, torch.randn_like(pred), pred)
    assert torch.allclose(model.forward_loss(imgs, other_pred, mask), base)

    # a change on a masked patch does move the loss
    moved_pred = torch.where(visible, pred, pred + 1.0)
    assert not torch.allclose(model.forward_loss(imgs, moved_pred, mask), base)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_mask_ratio_zero_gives_zero_loss(norm_pix_loss):
    model = make_model(norm_pix_loss=norm_pix_loss)
    loss, pred, mask = model(make_imgs(), mask_ratio=0.0)
    assert mask.sum() == 0
    assert math.isfinite(loss.item())
    assert loss.item() == 0.0
    loss.backward()  # the graph stays usable, with no NaN gradients
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_forward_features_ignores_rng():
    model = make_model().eval()
    imgs = make_imgs()
    torch.manual_seed(5)
    a = model.forward_features(imgs)
    torch.manual_seed(6)
    b = model.forward_features(imgs)
    assert torch.equal(a, b)


def test_optimizer_steps_lower_loss():
    model = make_model()
    imgs = make_imgs(4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss, _, _ = model(imgs, 0.75, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
