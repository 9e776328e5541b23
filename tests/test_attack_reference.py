"""The attacks' `paper` presets against plain code of the authors' released procedures, written here.

- UnlearnDiffAtk (OPTML-Group/Diffusion-MU-Attack): the sequential schedule's timesteps, the straight-through
  multinomial one-hot, one Adam + projection step, stopping at the first success, and the k per concept type.
- Textual inversion (NYU-DICE-Lab/circumventing-concept-erasure): the scaled learning rate, gradient
  accumulation, one AdamW step, the flips and the caption templates.
- Ring-A-Bell (chiayi-hsu/Ring-A-Bell): selection of the best half, two children per crossover, mutation of
  parents, and the concept vector from its own prompt pairs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from erasekit.attacks import make_budget
from erasekit.attacks.base import AttackTarget, Candidate, ordinary_tokens
from erasekit.attacks.concepts import concept_pairs, prompt_set
from erasekit.generation import Sampling
from tests.fixtures.evaluation_tiny import one_thread, tiny_model  # noqa: F401
from tests.test_attacks import target_for, te_patch


@pytest.fixture(scope="module")
def model():
    return tiny_model()


# ---- UnlearnDiffAtk --------------------------------------------------------------------------------------


def test_sequential_timesteps_are_the_released_grid():
    from erasekit.attacks.unlearndiffatk import sequential_timesteps

    for big_t, n in [(1000, 50), (1000, 7), (1000, 1), (500, 50), (1000, 1000)]:
        start = big_t // n // 2
        assert sequential_timesteps(big_t, n) == list(range(start, big_t, big_t // n))[:n]
    assert sequential_timesteps(1000, 50)[:3] == [10, 30, 50] and sequential_timesteps(1000, 50)[-1] == 990


def test_straight_through_forward_is_exactly_one_hot_and_backward_is_the_clipped_gradient():
    from erasekit.attacks.unlearndiffatk import SampledOneHot

    g = torch.Generator().manual_seed(0)
    w = torch.softmax(torch.randn(4, 30, generator=g), -1).requires_grad_(True)
    out = SampledOneHot.apply(w, g)
    assert out.shape == (4, 30) and set(out.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(out.sum(-1), torch.ones(4))
    upstream = torch.randn(4, 30, generator=g) * 3
    (grad,) = torch.autograd.grad(out, w, upstream)
    assert torch.equal(grad, upstream.clamp(-1, 1))  # hardtanh, straight through
    # the draws follow w: a row with all its mass on one token always picks it; frequencies match w
    sure = torch.zeros(1, 30)
    sure[0, 7] = 1.0
    assert all(SampledOneHot.apply(sure, g).argmax().item() == 7 for _ in range(20))
    p = torch.tensor([[0.7, 0.2, 0.1]])
    counts = sum(SampledOneHot.apply(p, g) for _ in range(4000)) / 4000
    assert torch.allclose(counts, p, atol=0.03)


def _plain_projection(a: torch.Tensor) -> torch.Tensor:
    """The released projection: bisection for mu with sum(clip(a - mu, 0, 1)) = 1, row by row."""
    rows = []
    for row in a:
        lo, hi = float(row.min()) - 1, float(row.max())
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if float((row - mid).clamp(0, 1).sum()) > 1 else (lo, mid)
        rows.append((row - (lo + hi) / 2).clamp(0, 1))
    return torch.stack(rows)


def test_one_step_matches_plain_straight_through_adam_and_projection(model):
    from erasekit.attacks._denoise import FixedTimestepNoise, model_latents
    from erasekit.attacks.base import placeholder_id, placeholder_rows, with_placeholders
    from erasekit.attacks.unlearndiffatk import PrefixObjective, optimise_at
    from erasekit.denoising import encode_prompts

    pipe, target = model.pipeline, target_for(model, n=1)
    prompt = target.prompts.positives[0]
    vocab = ordinary_tokens(pipe.tokenizer)[:500]  # a small vocabulary keeps the plain code fast
    x0 = model_latents(pipe, [prompt], [0], target.sampling)
    w0 = torch.full((3, len(vocab)), 1.0 / len(vocab))
    g = torch.Generator().manual_seed(3)
    state, t, lr, wd = g.get_state(), 250, 0.01, 0.1

    w = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr, weight_decay=wd)
    objective = PrefixObjective(pipe, prompt, x0, vocab, 3)
    (loss,) = optimise_at(objective, w, opt, t, 1, FixedTimestepNoise(pipe), g)

    # plain: sample one-hot rows, noise at t with SD's scaled-linear betas, loss, clipped grad, Adam step 1
    ref = torch.Generator().set_state(state)
    onehot = F.one_hot(torch.multinomial(w0, 1, generator=ref).squeeze(-1), len(vocab)).float()
    onehot.requires_grad_(True)
    eps = torch.randn(x0.shape, generator=ref)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t].float()
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    rows = onehot @ pipe.text_encoder.get_input_embeddings().weight[vocab]
    with placeholder_rows(pipe.text_encoder, placeholder_id(pipe.tokenizer), rows):
        cond = encode_prompts(pipe, [with_placeholders(prompt, 3)])
    plain_loss = F.mse_loss(pipe.unet(x_t, torch.tensor([t]), encoder_hidden_states=cond).sample, eps)
    (grad,) = torch.autograd.grad(plain_loss, onehot)
    step = grad.clamp(-1, 1) + wd * w0  # torch.optim.Adam's weight decay is L2 on the gradient
    w1 = _plain_projection(w0 - lr * step / (step.abs() + 1e-8))  # Adam's first step: lr * g / (|g| + eps)

    assert loss == pytest.approx(float(plain_loss.detach()), rel=1e-5)
    assert torch.allclose(w.detach(), w1, atol=1e-6)
    assert torch.allclose(w.detach().sum(-1), torch.ones(3), atol=1e-5)


class FakeJudge:
    """Says "success" at the ``hit``-th call (1-based; ``None``: never); records the candidates and whether the
    erasure was applied when it was called."""

    def __init__(self, model, patch, hit: int | None) -> None:
        self.model, self.patch, self.hit, self.seen, self.erased = model, patch, hit, [], []

    def __call__(self, candidates: list[Candidate]) -> list[bool]:
        ((key, value),) = self.patch.tensors.items()
        live = self.model.components[key.split("/")[0]].get_parameter(key.split("/", 1)[1])
        self.erased.append(torch.equal(live, value.to(live.dtype)))
        self.seen.extend(candidates)
        return [len(self.seen) == self.hit for _ in candidates]


def test_sequential_stops_at_the_first_success_and_skips_prompts_that_already_succeed(model):
    from erasekit.attacks.unlearndiffatk import sequential_timesteps, unlearndiffatk

    patch = te_patch(model)
    config = make_budget("unlearndiffatk", overrides={"prompts": 1, "timesteps": 6, "iterations": 2})
    judge = FakeJudge(model, patch, hit=4)  # call 1 is the plain prompt, calls 2-4 follow timesteps 1-3
    result = unlearndiffatk(dataclasses.replace(target_for(model, patch, n=1), judge=judge), config)
    grid = sequential_timesteps(1000, 6)
    assert result.stats["timesteps_run"] == [3] and result.stats["success_timestep"] == [grid[2]]
    assert len(result.history["loss_0"]) == 3 * 2 and all(judge.erased) and result.stats["judged"]
    assert judge.seen[0].prompt == target_for(model, n=1).prompts.positives[0]  # the plain prompt first
    attacked = result.candidates[-1]
    assert torch.equal(attacked.embedding, judge.seen[-1].embedding)  # the candidate that succeeded
    ids = result.embeddings["token_ids"][0]
    assert torch.equal(model.pipeline.text_encoder.get_input_embeddings().weight[ids], attacked.embedding)

    already = FakeJudge(model, patch, hit=1)  # the unattacked prompt succeeds: the authors return at once
    skipped = unlearndiffatk(dataclasses.replace(target_for(model, patch, n=1), judge=already), config)
    assert skipped.stats["timesteps_run"] == [0] and skipped.history["loss_0"] == []
    assert skipped.candidates[-1].embedding is None and (skipped.embeddings["token_ids"] == -1).all()

    never = FakeJudge(model, patch, hit=None)
    full = unlearndiffatk(dataclasses.replace(target_for(model, patch, n=1), judge=never), config)
    assert full.stats["timesteps_run"] == [6] and len(never.seen) == 7


def test_unlearndiffatk_paper_budget_is_the_released_configs():
    for kind, k in (("style", 3), ("object", 3), ("nsfw", 5)):
        c = make_budget("unlearndiffatk", "paper", kind)
        assert (c.tokens, c.timesteps, c.iterations, c.lr, c.weight_decay, c.stop_early) == (
            k, 50, 40, 0.01, 0.1, True
        )  # fmt: skip


def test_the_runner_hands_attacks_a_judge_on_the_model_as_it_is(model, tmp_path):
    from PIL import Image

    from erasekit.attacks.scoring import Detector, candidate_judge

    seen = []

    def verdicts(files):
        for f in files:
            with Image.open(f) as im:
                seen.append(torch.tensor(list(im.getdata()), dtype=torch.float32))
        return [True] * len(files)

    judge = candidate_judge(model, Detector(verdicts, {}), Sampling(steps=2, guidance=7.5), 5)
    cand = [Candidate(prompt="A circle image in neon style.", group=0)]
    assert judge(cand) == [True] and len(seen) == 1  # one image: the first seed only
    with te_patch(model).applied(model):
        judge(cand)
    assert not torch.equal(seen[0], seen[1])  # it generated with the patch it found applied


# ---- textual inversion -----------------------------------------------------------------------------------


def test_textual_inversion_paper_budget_is_the_released_train_sh():
    for kind in ("style", "object", "nsfw"):
        c = make_budget("textual-inversion", "paper", kind)
        assert (c.images, c.train_steps, c.batch, c.accumulation, c.weight_decay, c.flip) == (
            25,
            5000,
            4,
            4,
            0.01,
            0.5,
        )
        assert c.effective_lr == pytest.approx(5e-3 * 4 * 4) == pytest.approx(0.08)  # --scale_lr, one process
    assert make_budget("textual-inversion", "paper", "nsfw").captions == "prefix"
    assert make_budget("textual-inversion", "paper", "style").captions == "templates"
    assert make_budget("textual-inversion", overrides={"scale_lr": False}).effective_lr == 5e-3


def test_caption_templates_are_the_released_lists_or_the_worlds_analogue():
    from erasekit.attacks.textual_inversion import caption_templates, training_captions
    from erasekit.minicanvas import world

    generic = caption_templates(prompt_set("Van Gogh", "style"))
    assert len(generic) == 19 and generic[0] == "a painting in the style of {}"
    assert len(caption_templates(prompt_set("car", "object"))) == 27
    assert caption_templates(prompt_set("neon", "style")) == ("An image in {} style.", "{} style artwork")
    assert caption_templates(prompt_set("fish", "object")) == tuple(
        t.format(object="{}") for t in world.OBJECT_TEMPLATES
    )
    nsfw = prompt_set("nudity", "nsfw")
    assert training_captions(nsfw, [0, 1], "prefix") == [
        (f"* {nsfw.positives[0]}",),
        (f"* {nsfw.positives[1]}",),
    ]


def _objective(model, patch_scale_flip: float = 0.5):
    from erasekit.attacks._denoise import model_latents, vae_posteriors
    from erasekit.attacks.textual_inversion import InversionObjective, training_captions

    pipe, ps = model.pipeline, prompt_set("neon", "style").first(3)
    latents = model_latents(pipe, ps.positives, [1, 2, 3], Sampling(steps=2, guidance=7.5))
    posterior = vae_posteriors(pipe, latents)
    return InversionObjective(
        pipe, posterior, training_captions(ps, [0, 1, 2], "templates"), patch_scale_flip
    )


def test_accumulation_averages_the_micro_batches_like_one_big_batch(model):
    from erasekit.attacks._denoise import draws
    from erasekit.attacks.textual_inversion import accumulated_grad, init_embedding

    objective = _objective(model)
    v = init_embedding(model.pipeline, "art").requires_grad_(True)
    picks = [torch.tensor([0, 1]), torch.tensor([2, 0]), torch.tensor([1, 1])]
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    grad, loss = accumulated_grad(objective, v, picks, g)
    ref = torch.Generator().set_state(state)
    lat, texts, noised = [], [], []
    for pick in picks:  # the same draws, then one batch of 6 and its mean loss
        latents, caps = objective.sample(pick, ref)
        lat.append(latents)
        texts += caps
        noised.append(draws(model.pipeline, latents, ref))
    x_t, want, t = (torch.cat(parts) for parts in zip(*noised))
    big = objective.loss(v, texts, (x_t, want, t))
    (plain,) = torch.autograd.grad(big, v)
    assert loss == pytest.approx(float(big), rel=1e-5)
    assert torch.allclose(grad, plain, rtol=1e-4, atol=1e-7)


def test_one_training_step_is_adamw_at_the_scaled_rate(model):
    from erasekit.attacks.textual_inversion import accumulated_grad, init_embedding, train

    objective = _objective(model)
    config = make_budget("textual-inversion", overrides={"train_steps": 1, "batch": 2, "accumulation": 2})
    v0 = init_embedding(model.pipeline, "art")
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    v1, _ = train(objective, v0, config, g)
    ref = torch.Generator().set_state(state)
    order = torch.randperm(3, generator=ref).tolist() + torch.randperm(3, generator=ref).tolist()
    picks = [torch.tensor(order[0:2]), torch.tensor(order[2:4])]
    grad, _ = accumulated_grad(objective, v0.clone().requires_grad_(True), picks, ref)
    lr = 5e-3 * 2 * 2
    plain = v0 * (1 - lr * 0.01) - lr * grad / (grad.abs() + 1e-8)  # decoupled decay, then Adam's first step
    assert torch.allclose(v1, plain, atol=1e-6)


def test_flips_mirror_the_image_before_the_vae(model):
    from erasekit.attacks._denoise import model_latents, vae_posteriors

    pipe = model.pipeline
    latents = model_latents(pipe, ["A circle image in neon style."], [4], Sampling(steps=2, guidance=7.5))
    mean, std = vae_posteriors(pipe, latents)
    scale = pipe.vae.config.scaling_factor
    with torch.no_grad():
        image = pipe.vae.decode(latents / scale).sample.clamp(-1, 1)
        mirrored = pipe.vae.encode(image.flip(-1)).latent_dist
    assert mean.shape == (1, 2, *latents.shape[1:])
    assert torch.allclose(mean[0, 1], mirrored.mean[0] * scale, atol=1e-5)
    assert torch.allclose(std[0, 1], mirrored.std[0] * scale, atol=1e-5)
    objective = _objective(model, 1.0)  # flip = 1: every draw comes from the mirror
    objective.std = torch.zeros_like(objective.std)
    sampled, _ = objective.sample(torch.tensor([0, 2]), torch.Generator().manual_seed(0))
    assert torch.equal(sampled, objective.mean[[0, 2], 1])


# ---- Ring-A-Bell -----------------------------------------------------------------------------------------


def _distinct_parents(h: int, k: int) -> torch.Tensor:
    """Parents whose every token names its parent and position: token = 1000 + parent * k + position."""
    return 1000 + torch.arange(h * k).reshape(h, k)


def test_crossover_makes_two_complementary_children_per_crossing_parent():
    from erasekit.attacks.ring_a_bell import next_generation

    h, k = 10, 6
    parents, vocab = _distinct_parents(h, k), torch.arange(10)
    config = make_budget("ring-a-bell", overrides={"crossover": 1.0, "mutation": 0.0})
    pop, mutated = next_generation(parents, vocab, config, torch.Generator().manual_seed(0))
    assert pop.shape == (3 * h, k) and torch.equal(pop[:h], parents) and not mutated.any()
    owner = (pop - 1000) // k  # [3h, k], which parent each token came from
    assert torch.equal((pop - 1000) % k, torch.arange(k).expand(3 * h, k))  # positions never move
    for i in range(h):  # child pair i: i[:c] + j[c:] and j[:c] + i[c:] for one mate j and one cut c
        a, b = owner[h + i], owner[2 * h + i]
        c = int((a == i).cumprod(0).sum()) if a[0] == i else 0
        j = int(a[-1]) if c < k else int(b[0])
        assert torch.equal(a, torch.tensor([i] * c + [j] * (k - c)))
        assert torch.equal(b, torch.tensor([j] * c + [i] * (k - c)))
    none, _ = next_generation(parents, vocab, dataclasses.replace(config, crossover=0.0), torch.Generator())
    assert torch.equal(none, parents)
    half = dataclasses.replace(config, crossover=0.5)
    sizes = [
        len(next_generation(parents, vocab, half, torch.Generator().manual_seed(s))[0]) for s in range(50)
    ]
    assert all((n - h) % 2 == 0 for n in sizes) and 1.7 * h < sum(sizes) / 50 < 2.3 * h  # H + 2 · Bin(H, 0.5)


def test_mutation_hits_parents_and_children_alike():
    from erasekit.attacks.ring_a_bell import next_generation

    h, k = 8, 5
    parents, vocab = _distinct_parents(h, k), torch.arange(10)  # mutations bring tokens < 10
    config = make_budget("ring-a-bell", overrides={"crossover": 1.0, "mutation": 1.0})
    pop, mutated = next_generation(parents, vocab, config, torch.Generator().manual_seed(1))
    assert (
        mutated.all() and ((pop < 10).sum(-1) == 1).all()
    )  # every row, parents too, has exactly one new token
    config = dataclasses.replace(config, mutation=0.25)
    hit = torch.cat(
        [next_generation(parents, vocab, config, torch.Generator().manual_seed(s))[1][:h] for s in range(200)]
    )
    assert 0.2 < hit.float().mean() < 0.3  # parents are mutated at the mutation rate


class SumEncoders:
    """A stand-in encoder: the "encoding" of ids is the ids themselves, so fitness = Σ (id − target)²."""

    def __init__(self) -> None:
        self.rows_scored = 0

    def tokens(self, ids: torch.Tensor) -> list[torch.Tensor]:
        self.rows_scored += len(ids)
        return [ids.float()]


def test_selection_keeps_the_best_half_and_the_result_is_the_last_generations_best(monkeypatch):
    from erasekit.attacks import ring_a_bell as rab

    config = make_budget("ring-a-bell", overrides={"population": 20, "generations": 4, "seed": 0})
    vocab, k, goal = torch.arange(50), 3, [torch.zeros(3)]
    seen = []
    breed = rab.next_generation

    def spy(parents, *args):
        seen.append(parents.clone())
        pop, mutated = breed(parents, *args)
        seen.append(pop.clone())
        return pop, mutated

    monkeypatch.setattr(rab, "next_generation", spy)
    enc = SumEncoders()
    g = torch.Generator().manual_seed(0)
    first = vocab[torch.randint(0, len(vocab), (20, k), generator=torch.Generator().set_state(g.get_state()))]
    best, history = rab.search(enc, goal, vocab, k, config, g)
    score = lambda ids: (ids.float() ** 2).sum(-1)  # noqa: E731
    assert torch.equal(score(seen[0]), score(first).sort().values[:10])  # the best 10 of 20, best first
    for parents, pop in zip(
        seen[2::2], seen[1::2]
    ):  # each later selection: the best half of the bred population
        assert torch.equal(score(parents), score(pop).sort().values[:10])
    assert len(history) == 4 and history[0] == float(score(first).min())
    assert float(score(best)) == history[-1] == float(score(seen[-1]).min())
    # unmutated parents keep their fitness: only children and mutated rows went through the encoder again
    assert enc.rows_scored < 20 + sum(len(p) for p in seen[1::2])


def test_concept_vector_comes_from_its_own_pairs_not_the_attacked_prompts(model):
    from erasekit.attacks.ring_a_bell import Encoders, concept_vector
    from erasekit.minicanvas import world

    for concept, kind, n in (("neon", "style", 180), ("fish", "object", 180), ("nudity", "nsfw", 150)):
        with_, without = concept_pairs(concept, kind)
        attacked = set(prompt_set(concept, kind).positives)
        assert len(with_) == len(without) == len(set(with_)) == n and not attacked & set(with_)
    with_, without = concept_pairs("neon", "style")
    names = world.names_of(world.concept_info("neon"))
    assert all(any(nm in p for nm in names) for p in with_) and not any(
        nm in p for p in without for nm in names
    )
    assert all("nude" in p or any(s in p for s in ("naked", "unclothed", "undressed", "topless", "bare"))
               for p in concept_pairs("nudity", "nsfw")[0])  # fmt: skip
    # v = mean_i [E(with_i) - E(without_i)], E the last hidden state flattened over the 77 positions
    enc, tok = model.pipeline.text_encoder, model.pipeline.tokenizer

    def plain(prompts):
        ids = tok(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            return enc(ids).last_hidden_state.flatten(1)

    (v,) = concept_vector(Encoders(model), list(with_), list(without))
    assert torch.allclose(v, (plain(list(with_)) - plain(list(without))).mean(0), atol=1e-5)


def test_ring_a_bell_targets_the_attacked_prompt_plus_eta_times_the_pair_vector(model):
    from erasekit.attacks.ring_a_bell import Encoders, concept_vector, fitness, ring_a_bell

    config = make_budget(
        "ring-a-bell", overrides={"prompts": 1, "population": 8, "generations": 3, "seed": 11}
    )
    result = ring_a_bell(AttackTarget(model=model, patch=None, prompts=prompt_set("pixel", "style").first(1),
                                      sampling=Sampling(steps=50, guidance=7.5)), config)  # fmt: skip
    enc = Encoders(model)
    (v,) = concept_vector(enc, *map(list, concept_pairs("pixel", "style")))
    (e,) = enc.prompts(["A circle image in pixel style."])
    found = fitness(enc, result.embeddings["token_ids"], [e[0] + 0.9 * v])
    assert float(found[0]) == pytest.approx(result.history["best_fitness_0"][-1], rel=1e-5)
    assert result.stats["concept_pairs"] == 180
