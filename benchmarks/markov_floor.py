"""The markov task's loss floor: the MDM training loss a perfect denoiser reaches.

    python benchmarks/markov_floor.py

Feeds the exact posterior marginals (forward-backward, ``markov.posterior_marginals``) through the
training objective's ``mdm_term`` (t ~ U[0.1, 1], antithetic; the mean over tokens), 8 x 256
sequences. A trained model's ``mdm`` loss should approach this, not the process entropy.
"""

from __future__ import annotations

import torch

from pipeline.diffusion.objective import mask_tokens, mdm_term, sample_t
from pipeline.tasks import markov as M


def main(rounds: int = 8, batch: int = 256) -> float:
    gen, chain, values = torch.Generator().manual_seed(0), M.default_chain(), []
    for rep in range(rounds):
        x = M.sample(chain, batch, seed=rep)
        t = sample_t(batch, 0.1, True, gen)
        z = mask_tokens(x, t, M.MASK_ID, gen)
        logits = torch.full((batch, M.SEQ_LEN, M.VOCAB_SIZE), float("-inf"), dtype=torch.float64)
        logits[..., :M.ALPHABET] = M.posterior_marginals(chain, z).clamp_min(1e-300).log()
        values.append(mdm_term(logits, x, z, t.double(), M.MASK_ID, torch.ones_like(x, dtype=torch.bool)).mean())
    v = torch.stack(values)
    print(f"oracle MDM loss (t_eps 0.1, mean per token): {v.mean():.4f} +- {v.std() / len(v) ** 0.5:.4f} "
          f"(process entropy {M.entropy_per_token(chain):.4f})")
    return float(v.mean())


if __name__ == "__main__":
    main()
