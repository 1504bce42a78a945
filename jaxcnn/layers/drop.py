"""Stochastic regularisers: DropPath (stochastic depth) and DropBlock, drawing from 'dropout'."""

import flax.linen as nn
import jax
import jax.numpy as jnp


def drop_path_rates(drop_path_rate: float, num_blocks: int):
    """Linear-decay rule of Huang et al. 2016: block l of L drops with rate l/L * p_L.

    The survival probability p_l = 1 - l/L (1 - p_L) is the paper's; ``drop_path_rate`` is
    1 - p_L (0.5 in the paper), so the last block drops with exactly that rate.
    """
    if num_blocks <= 0:
        return []
    return [drop_path_rate * (i + 1) / num_blocks for i in range(num_blocks)]


class DropPath(nn.Module):
    """Drop the whole residual branch per sample with probability ``rate``.

    Surviving samples are scaled by 1 / (1 - rate) ("inverted" scaling), so inference
    needs no rescaling.
    """

    rate: float = 0.0  # may be a traced scalar when blocks are scanned

    @nn.compact
    def __call__(self, x, train: bool = False):
        if not train or (isinstance(self.rate, (int, float)) and self.rate == 0.0):
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(
            self.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1)
        )
        return jnp.where(mask, x / keep, 0).astype(x.dtype)


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018): drop contiguous block_size² regions of each feature map.

    gamma follows eq. (1) of the paper so that on average ``rate`` of the units are dropped;
    the survivors are rescaled by count/kept, as in the paper's Algorithm 1.
    """

    rate: float = 0.0
    block_size: int = 7

    @nn.compact
    def __call__(self, x, train: bool = False):
        if not train or self.rate == 0.0:
            return x
        n, h, w, c = x.shape
        bs = min(self.block_size, h, w)
        valid = (h - bs + 1) * (w - bs + 1)
        gamma = self.rate * h * w / (bs * bs) / valid
        # seeds only where a full block fits, then grow each seed into a bs x bs block
        seeds = jax.random.bernoulli(
            self.make_rng('dropout'), gamma, (n, h - bs + 1, w - bs + 1, c)
        )
        lo, hi = (bs - 1) // 2, bs // 2
        # pad back to h x w so a seed sits where its block's centre is
        seeds = jnp.pad(seeds.astype(jnp.float32), ((0, 0), (lo, hi), (lo, hi), (0, 0)))
        blocks = nn.max_pool(seeds, (bs, bs), (1, 1), ((lo, hi), (lo, hi)))
        keep = 1.0 - blocks
        scale = keep.size / jnp.maximum(keep.sum(), 1.0)
        return (x * keep * scale).astype(x.dtype)
