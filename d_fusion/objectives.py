"""Training objectives (docs/METHOD.md §7): pure functions of log-probabilities, noise predictions
and scores, one per paper.

Notation (per training timestep j of a stored transition x_t -> x_{t'}):
    logp_theta   log-probability under the policy (the UNet with LoRA)
    logp_ref     under the reference policy (the adapters off, i.e. the pretrained UNet)
    logp_old     under the policy that sampled the transition (DDPO's importance ratio)
    eps_*        the CFG noise predictions of the policy / reference
"""

import math

import torch
import torch.nn.functional as F


def clipped_log_ratio(log_ratio, eps):
    """log clamp(exp(log_ratio), 1 - eps, 1 + eps), and whether each ratio was clipped."""
    clipped = log_ratio.clamp(math.log(1 - eps), math.log(1 + eps))
    return clipped, clipped != log_ratio


def dpo_loss(log_ratio_w, log_ratio_l, noise_w, noise_ref_w, alpha, beta, eps):
    """Trajectory DPO of D3PO (Yang et al., CVPR 2024) on D-Fusion pairs:

        r_w = clamp(exp(logp_theta(w) - logp_ref(w)), 1 - eps, 1 + eps), r_l likewise
        loss = -log sigmoid(alpha * (log r_w - log r_l)) + beta * mean((eps_theta(w) - eps_ref(w))^2)

    Names: the release's config keeps D3PO's fields, so `alpha` is the DPO coefficient (Diffusion-DPO,
    Wallace et al. 2024, calls it beta) and `beta` weights a regulariser on the preferred trajectory;
    `eps` is D3PO's ratio clip.

    log_ratio_w, log_ratio_l: logp_theta - logp_ref of the preferred w (target) and the dispreferred l
    (base), (B,); noise_w, noise_ref_w: the policy's and reference's noise predictions on w,
    (B, C, H, W). Returns (loss (B,), stats {name: (B,)}).
    """
    log_r_w, clipped_w = clipped_log_ratio(log_ratio_w, eps)
    log_r_l, clipped_l = clipped_log_ratio(log_ratio_l, eps)
    regulariser = ((noise_w - noise_ref_w) ** 2).mean(dim=tuple(range(1, noise_w.ndim)))  # (B,)
    loss = -F.logsigmoid(alpha * (log_r_w - log_r_l)) + beta * regulariser
    stats = dict(
        accuracy=(log_ratio_w > log_ratio_l).float(),
        abs_log_ratio=(log_ratio_w.abs() + log_ratio_l.abs()) / 2,
        clipped=(clipped_w.float() + clipped_l.float()) / 2,
    )
    return loss, stats


def ppo_loss(log_prob, old_log_prob, advantages, eps):
    """DDPO's PPO-clip loss (Black et al., ICLR 2024), (B,):

        ratio = exp(logp_theta - logp_old);  loss = max(-A * ratio, -A * clamp(ratio, 1 - eps, 1 + eps))
    """
    log_ratio = log_prob - old_log_prob
    ratio = log_ratio.exp()
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps))
    stats = dict(abs_log_ratio=log_ratio.abs(), clipped=((ratio - 1).abs() > eps).float())
    return loss, stats


def gaussian_kl(mean, ref_mean, std):
    """KL(N(mean, std^2) || N(ref_mean, std^2)) averaged over the latent dims: mean((mean - ref_mean)^2 / (2 std^2)).

    mean, ref_mean: (B, C, H, W); std: (B, 1, 1, 1), > 0. Returns (B,).
    """
    return ((mean - ref_mean) ** 2 / (2 * std**2)).mean(dim=tuple(range(1, mean.ndim)))


def dpok_loss(log_prob, old_log_prob, advantages, mean, ref_mean, std, eps, kl_weight):
    """DPOK (Fan et al., NeurIPS 2023; docs/METHOD.md §8): DDPO's PPO-clip term plus kl_weight x the step's
    closed-form KL to the pretrained model,

        loss = ppo_loss + kl_weight * mean((mu_theta(x_t) - mu_ref(x_t))^2 / (2 std_t^2))

    mean, ref_mean: the step's mean under the policy and the reference (B, C, H, W); std: (B, 1, 1, 1).
    Returns (loss (B,), stats {name: (B,)}).
    """
    loss, stats = ppo_loss(log_prob, old_log_prob, advantages, eps)
    kl = gaussian_kl(mean, ref_mean, std)
    return loss + kl_weight * kl, stats | dict(kl=kl)


def per_prompt_advantages(scores, prompts, clip, history=None, buffer_size=0, min_count=0):
    """DDPO's advantages: (s - mean_p) / (std_p + 1e-6) per prompt, clipped to +-clip: (N,).

    Without `buffer_size` the statistics are those of the prompt's scores in `scores` (this epoch's).
    With it, ddpo-pytorch's per-prompt stat tracking: those of the prompt's last `buffer_size` scores
    (`history[prompt]`: its scores of earlier epochs, oldest first, then this epoch's), or of all of
    `scores` (batch-wide) while that buffer holds fewer than `min_count`.
    """
    scores = torch.as_tensor(scores, dtype=torch.float32)
    advantages = torch.empty_like(scores)
    for prompt in dict.fromkeys(prompts):
        rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
        group = scores[rows]
        if buffer_size:
            buffer = torch.tensor((list((history or {}).get(prompt, [])) + group.tolist())[-buffer_size:])
            group = buffer if len(buffer) >= min_count else scores
        advantages[rows] = (scores[rows] - group.mean()) / (group.std(unbiased=False) + 1e-6)
    return advantages.clamp(-clip, clip)
