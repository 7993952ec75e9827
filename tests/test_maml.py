"""MAML path: meta-gradients against a naive reference, BatchNorm semantics, memory, regression."""

from __future__ import annotations

import copy
import gc
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from protonets.maml import MetaLearner, TaskBatch, batchnorm_mode, proto_init

pytestmark = pytest.mark.usefixtures("one_torch_thread")


T, N_WAY, SHOTS, QUERIES, STEPS, LR = 3, 3, 2, 3, 2, 0.3


def _body(bn: bool) -> nn.Module:
    layers = [nn.Conv2d(1, 3, 3, padding=1)]
    layers += [nn.BatchNorm2d(3)] if bn else []
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()]
    return nn.Sequential(*layers)


def _tasks(seed: int = 0, dtype: torch.dtype = torch.float64) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(N_WAY).repeat_interleave(SHOTS).expand(T, -1)
    yq = torch.arange(N_WAY).repeat_interleave(QUERIES).expand(T, -1)
    xs = torch.randn(T, N_WAY * SHOTS, 1, 6, 6, generator=g, dtype=dtype)
    xq = torch.randn(T, N_WAY * QUERIES, 1, 6, 6, generator=g, dtype=dtype)
    return TaskBatch(xs, ys, xq, yq)


def _learner(method: str, bn: bool, vmap: bool, **kw) -> MetaLearner:
    torch.manual_seed(0)
    body, head = _body(bn), nn.Linear(27, N_WAY)
    if bn:  # non-trivial affine and running statistics, so every path is exercised
        with torch.no_grad():
            body[1].weight.uniform_(0.5, 1.5)
            body[1].bias.uniform_(-0.5, 0.5)
            body[1].running_mean.uniform_(-0.5, 0.5)
            body[1].running_var.uniform_(0.5, 2.0)
    adapt = "head" if method == "anil" else "all"
    learner = MetaLearner(
        head, body, steps=STEPS, lr=LR, first_order=method == "fomaml", adapt=adapt, vmap=vmap, **kw
    )
    return learner.double()


# -- the naive reference: learn2learn-style clone + explicit autograd, one task at a time --------
def _clone(module: nn.Module) -> nn.Module:
    """A differentiable copy: parameters are `p.clone()` (graph kept), buffers copied."""
    clone = copy.copy(module)
    clone._parameters = {k: None if p is None else p.clone() for k, p in module._parameters.items()}
    clone._buffers = {k: None if b is None else b.clone() for k, b in module._buffers.items()}
    clone._modules = {k: None if m is None else _clone(m) for k, m in module._modules.items()}
    return clone


def _named(module: nn.Module, prefix: str) -> list[tuple[nn.Module, str, str]]:
    out = []
    for mod_name, mod in module.named_modules():
        for k in mod._parameters:
            out.append((mod, k, f"{prefix}{mod_name + '.' if mod_name else ''}{k}"))
    return out


def _naive_meta_grads(
    learner: MetaLearner, batch: TaskBatch, frozen: bool = False
) -> dict[str, torch.Tensor]:
    """Mean query loss over tasks, differentiated with torch.autograd through copied parameters."""
    ref = copy.deepcopy(learner)
    ref.zero_grad(set_to_none=True)
    ref.train(not frozen)
    second_order = not ref.first_order
    head_only = ref.head_only
    lrs = {n: ref.inner_lrs[n.replace(".", "__")] for n in ref.adapted_names} if len(ref.inner_lrs) else None
    total = 0.0
    for t in range(len(batch)):
        body, head = _clone(ref.body), _clone(ref.head)
        xs, ys, xq, yq = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
        if ref.proto_init is not None:  # W0(θ) from its own copy: the inner steps treat W, θ as separate
            feats = _clone(ref.body)(xs)
            protos = torch.stack([feats[ys == k].mean(0) for k in range(N_WAY)])
            head._parameters["weight"] = 2 * protos
            head._parameters["bias"] = -(protos**2).sum(1)
        slots = _named(head, "head.") + ([] if head_only else _named(body, "body."))
        fs, fq = (body(xs), body(xq)) if head_only else (None, None)
        for _ in range(ref.steps):
            out = head(fs) if head_only else head(body(xs))
            loss = F.cross_entropy(out, ys)
            tensors = [mod._parameters[k] for mod, k, _ in slots]
            grads = torch.autograd.grad(loss, tensors, create_graph=second_order, retain_graph=True)
            for (mod, k, name), p, g in zip(slots, tensors, grads):
                step = lrs[name] if lrs else ref.lr
                mod._parameters[k] = p - step * g
        out = head(fq) if head_only else head(body(xq))
        total = total + F.cross_entropy(out, yq)
    (total / len(batch)).backward()
    return {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


def _package_meta_grads(learner: MetaLearner, batch: TaskBatch, frozen: bool = False):
    learner.zero_grad(set_to_none=True)
    if frozen:
        learner.batchnorm = "frozen"
    learner.meta_backward(batch)
    return {n: p.grad for n, p in learner.named_parameters() if p.grad is not None}


def _assert_same_grads(ours: dict, ref: dict) -> None:
    assert set(ours) == set(ref), (sorted(ours), sorted(ref))
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=1e-8, msg=name)


@pytest.mark.parametrize("vmap", [False, True], ids=["loop", "vmap"])
@pytest.mark.parametrize("bn", [False, True], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("method", ["maml", "fomaml", "anil"])
def test_meta_gradient_equals_naive_reference(method, bn, vmap):
    learner, batch = _learner(method, bn, vmap), _tasks()
    ref = _naive_meta_grads(learner, batch)
    ours = _package_meta_grads(learner, batch)
    _assert_same_grads(ours, ref)
    assert any(n.startswith("body.") for n in ours)  # the body gets a meta-gradient in ANIL too


@pytest.mark.parametrize("vmap", [False, True], ids=["loop", "vmap"])
@pytest.mark.parametrize("method", ["maml", "anil"])
def test_frozen_batchnorm_meta_gradient_equals_eval_mode_reference(method, vmap):
    learner, batch = _learner(method, True, vmap, batchnorm="frozen"), _tasks(1)
    _assert_same_grads(_package_meta_grads(learner, batch), _naive_meta_grads(learner, batch, frozen=True))


@pytest.mark.parametrize("vmap", [False, True], ids=["loop", "vmap"])
@pytest.mark.parametrize("method", ["maml", "fomaml", "anil"])
def test_meta_sgd_and_proto_maml_meta_gradients(method, vmap):
    learner = _learner(method, True, vmap, meta_sgd=True, proto_init="euclidean")
    batch = _tasks(2)
    ours = _package_meta_grads(learner, batch)
    _assert_same_grads(ours, _naive_meta_grads(learner, batch))
    assert {"inner_lrs.head__weight", "inner_lrs.head__bias"} <= set(ours)
    assert "head.weight" not in ours  # Proto-MAML replaces the head's weights per task


def test_naive_vmap_of_train_mode_batchnorm_fails_and_fused_kernel_disagrees():
    """Why `batchnorm_mode` exists: what a plain vmap of BatchNorm in training mode does."""
    from torch.func import functional_call, grad, vmap

    learner, batch = _learner("maml", True, True), _tasks()
    params = dict(learner.named_parameters())

    def task(p, xs, ys, xq, yq):
        def support(q):
            return F.cross_entropy(functional_call(learner, q, (xs,)), ys)

        for _ in range(STEPS):
            g = grad(support)(p)
            p = {k: p[k] - LR * g[k] for k in p}
        return F.cross_entropy(functional_call(learner, p, (xq,)), yq)

    args = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    with pytest.raises(RuntimeError, match="in-place|inplace"):  # running-stat update under grad/vmap
        vmap(task, in_dims=(None, 0, 0, 0, 0))(params, *args)
    learner.body[1].track_running_stats = False  # no updates: vmap runs, fused kernel, second order
    learner.body[1].running_mean = learner.body[1].running_var = None
    fused = torch.autograd.grad(
        vmap(task, in_dims=(None, 0, 0, 0, 0))(params, *args).mean(), [params["head.bias"]]
    )
    exact = _naive_meta_grads(learner, batch)["head.bias"]
    err = float((fused[0] - exact).abs().max())
    if err < 1e-8:
        pytest.skip(f"this torch's fused batch-norm second order under vmap agrees ({err:.1e})")
    assert err > 1e-6


def test_no_state_leaks_between_tasks_or_into_the_module():
    learner, batch = _learner("maml", True, True), _tasks()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    forward = learner.body[1].forward
    out_all = learner.predict(batch.support_x, batch.support_y, batch.query_x)
    out_one = learner.predict(batch.support_x[1:2], batch.support_y[1:2], batch.query_x[1:2])
    torch.testing.assert_close(out_all[1:2], out_one, rtol=0, atol=1e-10)  # task 1 alone == in a batch
    learner.meta_backward(batch)
    for k, v in learner.state_dict().items():
        assert torch.equal(v, before[k]), k  # running stats and num_batches_tracked untouched
    assert learner.body[1].forward == forward  # the BatchNorm patch is undone


def test_batchnorm_mode_matches_torch_and_restores_on_error():
    bn = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.weight.uniform_(0.5, 2)
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    with batchnorm_mode(bn, "batch"):
        y_batch = bn(x)
    with batchnorm_mode(bn, "frozen"):
        y_frozen = bn(x)
    torch.testing.assert_close(y_batch, copy.deepcopy(bn).train()(x))
    torch.testing.assert_close(y_frozen, copy.deepcopy(bn).eval()(x))
    with pytest.raises(KeyError), batchnorm_mode(bn, "batch"):
        raise KeyError("an error inside the block")
    assert "forward" not in bn.__dict__
    with pytest.raises(ValueError, match="batchnorm must be one of"), batchnorm_mode(bn, "running"):
        pass


def test_frozen_mode_of_a_timm_encoder_is_its_eval_mode_and_batch_mode_its_train_mode():
    """timm's BatchNormAct2d (norm, then activation) inside a real pretrained-style encoder."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with batchnorm_mode(model.eval(), "frozen"):
        frozen = model(x)
    torch.testing.assert_close(frozen, model.eval()(x))
    with batchnorm_mode(model, "batch"):
        batch = model(x)
    torch.testing.assert_close(batch, copy.deepcopy(model).train()(x))


def test_proto_init_reproduces_the_prototype_head():
    from protonets.heads import PrototypeHead

    g = torch.Generator().manual_seed(0)
    support, labels = torch.randn(10, 6, generator=g), torch.arange(5).repeat(2)
    query = torch.randn(7, 6, generator=g)
    p = proto_init(support, labels, 5)
    linear = query @ p["weight"].T + p["bias"]
    proto = PrototypeHead("euclidean").fit(support, labels)(query)
    # equal up to the per-query constant ‖q‖², so the same softmax
    torch.testing.assert_close(linear.softmax(-1), proto.softmax(-1), rtol=1e-5, atol=1e-6)
    pc = proto_init(support, labels, 5, "cosine", scale=10.0)  # W: scale × unit prototype directions
    cos = F.normalize(query, dim=-1) @ pc["weight"].T + pc["bias"]
    torch.testing.assert_close(cos, PrototypeHead("cosine", scale=10.0).fit(support, labels)(query))


def test_memory_stays_flat_over_many_meta_steps():
    learner, batch = _learner("maml", True, True), _tasks()
    learner = learner.float()
    batch = TaskBatch(batch.support_x.float(), batch.support_y, batch.query_x.float(), batch.query_y)
    opt = torch.optim.SGD(learner.parameters(), lr=1e-3)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    def rss_mb() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096 / 2**20

    counts, rss = [], []
    for step in range(200):
        opt.zero_grad()
        learner.meta_backward(batch)
        opt.step()
        if step in (20, 199):
            counts.append(live_tensors())
            rss.append(rss_mb())
    assert counts[1] == counts[0], counts  # no tensors (graphs, fast weights) pile up
    assert rss[1] - rss[0] < 20, rss


# -- regression through the same core -------------------------------------------------------------
def test_linear_regression_tasks_one_adapted_copy_per_task():
    """A 1→1 linear base learner per task (y = a·x + b), meta-learned initialisation, MSE."""
    g = torch.Generator().manual_seed(0)
    learner = MetaLearner(nn.Linear(1, 1), loss_fn=F.mse_loss, steps=1, lr=0.3, vmap=True)
    opt = torch.optim.Adam(learner.parameters(), lr=0.02)

    def tasks(n: int) -> tuple[TaskBatch, torch.Tensor]:
        a = 2.0 + 0.5 * torch.randn(n, 1, 1, generator=g)
        b = -1.0 + 0.5 * torch.randn(n, 1, 1, generator=g)
        x = torch.rand(n, 20, 1, generator=g) * 4 - 2
        y = a * x + b
        return TaskBatch(x[:, :10], y[:, :10], x[:, 10:], y[:, 10:]), torch.cat([a, b], 1).squeeze(-1)

    test, _ = tasks(50)

    def post_loss() -> float:
        return float(F.mse_loss(learner.predict(test.support_x, test.support_y, test.query_x), test.query_y))

    before = post_loss()
    for _ in range(300):
        batch, _ = tasks(16)
        opt.zero_grad()
        learner.meta_backward(batch)
        opt.step()
    after = post_loss()
    assert after < 0.2 * before, (before, after)
    fast = learner.adapt(test.support_x, test.support_y)
    assert fast["head.weight"].shape == (50, 1, 1)  # one adapted base learner per task
    assert fast["head.weight"].std() > 0.05  # ... that differ from task to task
    torch.testing.assert_close(learner.head.weight.detach().mean(), torch.tensor(2.0), atol=0.6, rtol=0)


def test_sinusoid_regression_adaptation_improves_after_meta_training():
    """Finn et al. 2017: y = A sin(x − φ), 10-shot; a small MLP, 2nd-order MAML, vmapped."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    learner = MetaLearner(net, loss_fn=F.mse_loss, steps=1, lr=0.01, vmap=True)  # tiny model: vmap wins
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)

    def tasks(n: int) -> TaskBatch:
        amp = torch.rand(n, 1, 1, generator=g) * 4.9 + 0.1
        phase = torch.rand(n, 1, 1, generator=g) * math.pi
        x = torch.rand(n, 20, 1, generator=g) * 10 - 5
        y = amp * torch.sin(x - phase)
        return TaskBatch(x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])

    test = tasks(100)

    def losses() -> tuple[float, float]:
        pre = F.mse_loss(learner.predict(test.support_x, test.support_y, test.query_x, steps=0), test.query_y)
        post = F.mse_loss(
            learner.predict(test.support_x, test.support_y, test.query_x, steps=5), test.query_y
        )
        return float(pre), float(post)

    pre0, post0 = losses()
    for _ in range(400):
        opt.zero_grad()
        learner.meta_backward(tasks(25))
        opt.step()
    pre, post = losses()
    assert post < post0 and post < 0.6 * pre, (pre0, post0, pre, post)


# -- the few-shot head and its front doors --------------------------------------------------------
def _episode(seed=0, dim=16):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(5, dim)) * 2
    s_labels = np.repeat(np.arange(5), 3)
    q_labels = np.repeat(np.arange(5), 4)
    support = centers[s_labels] + rng.normal(size=(15, dim))
    query = centers[q_labels] + rng.normal(size=(20, dim))
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return as_t(support), torch.as_tensor(s_labels), as_t(query), torch.as_tensor(q_labels)


def test_maml_head_zero_steps_is_the_prototype_head_and_steps_fit_the_support():
    from protonets.heads import PrototypeHead, create_head

    support, labels, query, _ = _episode()
    for metric in ("euclidean", "cosine"):
        head0 = create_head("maml", metric=metric, steps=0)
        proto = PrototypeHead(metric).fit(support, labels)
        torch.testing.assert_close(head0.fit(support, labels)(query).softmax(-1), proto(query).softmax(-1))
    loss = [
        float(
            F.cross_entropy(
                create_head("maml", metric="cosine", steps=s).fit(support, labels)(support), labels
            )
        )
        for s in (0, 20)
    ]
    assert loss[1] < loss[0]


def test_maml_head_state_dict_round_trip():
    from protonets.heads import create_head

    support, labels, query, _ = _episode()
    head = create_head("maml", metric="cosine", feature_transform="cl2n", steps=5, lr=0.5).fit(
        support, labels
    )
    fresh = create_head("maml", **head.hyperparameters())
    fresh.load_state_dict(head.state_dict())
    torch.testing.assert_close(fresh(query), head(query))
    with pytest.raises(RuntimeError, match="not fitted"):
        create_head("maml")(query)
    with pytest.raises(ValueError, match="steps"):
        create_head("maml", steps=-1)


def test_classifier_with_maml_head_fits_saves_and_loads(tmp_path):
    from protonets import FewShotClassifier

    support, labels, query, q_labels = _episode(3)
    names = np.array(["a", "b", "c", "d", "e"])
    clf = FewShotClassifier(head="maml", steps=10, inner_lr=0.5).fit(support.numpy(), names[labels])
    assert (clf.predict(query.numpy()) == names[q_labels]).mean() > 0.8
    assert clf.head_.steps == 10 and clf.head_.lr == 0.5
    clf.save(tmp_path / "clf")
    again = FewShotClassifier.load(tmp_path / "clf")
    np.testing.assert_allclose(again.predict_proba(query.numpy()), clf.predict_proba(query.numpy()))


def test_eval_method_maml_runs_on_episodes_and_zero_steps_equals_prototype():
    from protonets.episodes import sample_episodes
    from protonets.eval.protocol import METHODS, evaluate

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 12)
    centers = rng.normal(size=(10, 8)) * 1.5
    emb = torch.as_tensor(centers[labels] + rng.normal(size=(120, 8)), dtype=torch.float32)
    episodes = sample_episodes(labels, 5, 2, 5, 40, seed=0)
    assert "maml" in METHODS
    proto = evaluate(emb, episodes, "prototype")
    zero = evaluate(emb, episodes, "maml", steps=0, metric="euclidean")
    np.testing.assert_allclose(zero, proto)
    tuned = evaluate(emb, episodes, "maml")
    assert tuned.shape == (40,) and 0.5 < tuned.mean() <= 1.0


def test_classify_command_accepts_maml_head():
    from protonets.cli import build_parser

    args = build_parser().parse_args(
        ["classify", "s", "q.jpg", "--head", "maml", "--steps", "3", "--inner-lr", "0.2"]
    )
    assert (args.head, args.steps, args.inner_lr) == ("maml", 3, 0.2)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="batchnorm"):
        MetaLearner(nn.Linear(2, 2), batchnorm="running")
    with pytest.raises(ValueError, match="adapt"):
        MetaLearner(nn.Linear(2, 2), adapt="body")
    with pytest.raises(TypeError, match="proto_init needs head=nn.Linear"):
        MetaLearner(nn.Sequential(nn.Linear(2, 2)), proto_init="euclidean")
    learner = MetaLearner(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="leading task dimension"):
        learner.predict(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.zeros(3, 2))


# -- meta-training on the episodic trainer -------------------------------------------------------
def _image_sets():
    from protonets.training import ImageSet

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (60, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(10).repeat_interleave(6)
    return ImageSet(images[:36], labels[:36]), ImageSet(images[36:], labels[36:])


def test_meta_trainer_checkpoint_log_load_and_resume(tmp_path):
    from protonets.encoders import create_encoder
    from protonets.maml.train import MetaConfig, MetaTrainer, load_meta_learner
    from protonets.training import TrainConfig, read_log

    train, val = _image_sets()
    config = TrainConfig(
        ways=3,
        shots=1,
        queries=2,
        episodes=4,
        val_ways=3,
        val_shots=1,
        val_queries=2,
        val_episodes=4,
        val_every=2,
    )
    meta = MetaConfig(method="anil", meta_batch=2, inner_steps=1, eval_inner_steps=2, meta_sgd=True)

    def trainer(episodes: int) -> MetaTrainer:
        cfg = TrainConfig(**{**config.to_dict(), "episodes": episodes})
        torch.manual_seed(0)  # as `protonets train` does before building the model
        encoder = create_encoder("conv4", pretrained=False)
        return MetaTrainer(encoder, train, val, cfg, meta, output=tmp_path / "run", progress=False)

    straight = trainer(6)
    straight.output = None  # the same run in memory, for comparison
    straight.fit()
    first = trainer(4)
    result = first.fit()
    assert result.step == 4 and [r["step"] for r in read_log(tmp_path / "run")] == [0, 2, 4]
    learner, encoder, loaded = load_meta_learner(tmp_path / "run")
    assert loaded == meta and encoder.name == "conv4"
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["method"] == "anil" and manifest["head"]["name"] == "maml"
    from PIL import Image

    from protonets.maml.train import evaluate_episodes

    paths = []
    for i, image in enumerate(train.images[:12]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image[0].numpy()).save(paths[-1])
    episodes = np.arange(12).reshape(2, 3, 2)  # 2 episodes, 3 ways, 1 shot + 1 query
    acc = evaluate_episodes(learner, encoder, paths, episodes, shots=1)
    assert acc.shape == (2,) and ((acc >= 0) & (acc <= 1)).all()
    best = {k: v for k, v in first.learner.state_dict().items() if not k.startswith("body.")}
    for k, v in best.items():
        torch.testing.assert_close(learner.state_dict()[k], v)
    resumed = trainer(6)
    resumed.resume()
    resumed.fit()
    assert resumed.step == 6 and [r["step"] for r in read_log(tmp_path / "run")] == [0, 2, 4, 6]
    assert straight.history[-1]["train_loss"] == pytest.approx(resumed.history[-1]["train_loss"], rel=1e-5)


def test_meta_trainer_refuses_other_val_ways_and_train_options_parse():
    import argparse

    from protonets.cli.train_maml import add_train_options, meta_config
    from protonets.encoders import UserInputError, create_encoder
    from protonets.maml.train import MetaConfig, MetaTrainer
    from protonets.training import TrainConfig

    train, val = _image_sets()
    config = TrainConfig(ways=3, shots=1, queries=2, val_ways=5, val_shots=1, val_queries=1)
    for meta in (MetaConfig(), MetaConfig(proto_init=True)):  # a Proto-MAML head has 3 columns too
        with pytest.raises(UserInputError, match="--val-ways 3"):
            MetaTrainer(create_encoder("conv4", pretrained=False), train, val, config, meta)
    parser = argparse.ArgumentParser()
    parser.add_argument("--method")
    add_train_options(parser)
    args = parser.parse_args(
        ["--method", "fomaml", "--inner-steps", "5", "--inner-lr", "0.1", "--proto-init"]
    )
    assert meta_config(args) == MetaConfig(method="fomaml", inner_steps=5, inner_lr=0.1, proto_init=True)
    with pytest.raises(UserInputError, match="method must be one of"):
        MetaConfig(method="reptile")


def test_train_command_runs_maml_methods(tmp_path):
    """`protonets train --method fomaml` writes a checkpoint with its MAML learner beside it."""
    from protonets.cli import main
    from tests.conftest import EXAMPLES

    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--method",
            "fomaml",
            "--dataset",
            "folder",
            "--data",
            str(EXAMPLES / "support"),
            "--val-split",
            "none",
            "--episodes",
            "2",
            "--meta-batch",
            "2",
            "--ways",
            "3",
            "--shots",
            "1",
            "--queries",
            "2",
            "--output",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    assert (out / "manifest.json").is_file() and (out / "maml" / "manifest.json").is_file()
    assert len((out / "train_log.jsonl").read_text().splitlines()) >= 1


def _spy_on_meta_episodes(monkeypatch) -> list[int]:
    """Count the calls of the meta-trained evaluation path (not the Proto-MAML fallback)."""
    from protonets.eval.meta import MetaEpisodes

    calls, original = [], MetaEpisodes.evaluate

    def evaluate(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MetaEpisodes, "evaluate", evaluate)
    return calls


def test_eval_command_adapts_a_meta_trained_checkpoint_on_episode_images(tmp_path, capsys, monkeypatch):
    """`protonets eval --method maml --checkpoint DIR` on a meta-trained DIR runs its learner."""
    from protonets.cli import main
    from protonets.encoders import UserInputError
    from protonets.episodes import sample_episodes
    from protonets.eval.datasets import load_dataset
    from protonets.maml.train import evaluate_episodes, load_meta_learner
    from tests.conftest import EXAMPLES

    data, out = str(EXAMPLES / "support"), tmp_path / "run"
    train = ["train", "--method", "maml", "--dataset", "folder", "--data", data, "--val-split", "none"]
    train += ["--episodes", "3", "--meta-batch", "2", "--ways", "3", "--shots", "1", "--queries", "2"]
    assert main([*train, "--inner-steps", "1", "--output", str(out), "--quiet"]) == 0
    episodes = ["--ways", "3", "--shots", "1", "--queries", "2", "--episodes", "6", "--seed", "1"]
    evaluate = ["eval", "--dataset", "folder", "--data", data, *episodes, "--checkpoint", str(out)]
    evaluate += ["--no-cache", "--quiet", "--method", "maml", "prototype", "--maml-steps", "2"]
    calls = _spy_on_meta_episodes(monkeypatch)
    assert main([*evaluate, "--output", str(tmp_path / "r.json")]) == 0
    assert calls == [1]  # the learner itself was evaluated, once for the one (ways, shots)
    rows = {r["method"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert set(rows) == {"maml", "prototype"}

    dataset = load_dataset("folder", data, None)
    batch = sample_episodes(dataset.labels, 3, 1, 2, 6, seed=1, class_names=dataset.class_names)
    learner, encoder, _ = load_meta_learner(out)
    expected = evaluate_episodes(learner, encoder, dataset.items, batch.indices, 1, steps=2)
    assert rows["maml"]["accuracy"] == pytest.approx(expected.mean(), abs=1e-6)

    capsys.readouterr()
    wide = [a if a != "3" else "4" for a in evaluate]  # 4-way episodes for a 3-way head
    assert main(wide) != 0
    assert "meta-trained for 3-way episodes" in capsys.readouterr().err
    with pytest.raises(UserInputError, match="--ways 3"):
        from protonets.eval.meta import MetaEpisodes

        MetaEpisodes(learner, encoder, dataset.items).check_ways(5)


def test_frozen_anil_head_meta_trains_on_embeddings_and_beats_its_start():
    """ANIL on cached embeddings (Meta-SGD step sizes): validation accuracy rises well above the start."""
    from protonets.encoders import UserInputError
    from protonets.episodes import EpisodeSampler
    from protonets.maml.frozen import episode_tasks, head_features, train_frozen_anil
    from protonets.maml.train import MetaConfig, create_meta_learner
    from protonets.maml.train import query_scores as accuracy
    from protonets.training import TrainConfig

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(40), 10)
    centers = rng.normal(size=(40, 16))
    emb = torch.as_tensor(centers[labels] + 0.8 * rng.normal(size=(400, 16)), dtype=torch.float32)
    train, val = labels < 30, labels >= 30
    config = TrainConfig(ways=5, shots=1, queries=3, episodes=60, lr=0.05, val_ways=5, val_shots=1)
    config.val_queries, config.val_episodes, config.val_every = 3, 100, 20
    meta = MetaConfig(
        method="anil", frozen_encoder=True, inner_steps=1, eval_inner_steps=1, inner_lr=0.5, meta_sgd=True
    )
    torch.manual_seed(0)
    learner = create_meta_learner(None, 16, 5, meta)
    assert learner.body is None
    sampler = EpisodeSampler(torch.as_tensor(labels[val]) - 30, 5, 1, 3)
    tasks = episode_tasks(head_features(emb[val]), sampler.sample(np.random.default_rng(9), 100), 1)
    before = float(accuracy(learner, tasks, 1)[1].mean())
    history = train_frozen_anil(
        learner,
        emb[train],
        torch.as_tensor(labels[train]),
        emb[val],
        torch.as_tensor(labels[val]) - 30,
        config,
        meta_batch=8,
        eval_steps=1,
    )
    assert [r["step"] for r in history] == [20, 40, 60]
    after = float(accuracy(learner, tasks, 1)[1].mean())
    wide = TrainConfig(**{**config.to_dict(), "val_ways": 6})
    with pytest.raises(UserInputError, match="--val-ways 5"):
        train_frozen_anil(
            learner,
            emb[train],
            torch.as_tensor(labels[train]),
            emb[val],
            torch.as_tensor(labels[val]),
            wide,
            8,
        )
    assert after > before + 0.1 and after > 0.6, (before, after)
    best = max(history, key=lambda r: (r["val_acc"], -r["val_loss"]))
    assert best["best"]


def test_train_command_anil_on_a_frozen_encoder_and_eval_on_its_embeddings(tmp_path, capsys, monkeypatch):
    """`protonets train --method anil --freeze-encoder` → `protonets eval --method maml` on embeddings."""
    from protonets.cli import main
    from protonets.encoders import UserInputError
    from protonets.episodes import sample_episodes
    from protonets.eval.datasets import load_dataset
    from protonets.eval.run import embed_dataset
    from protonets.maml.frozen import episode_tasks, head_features
    from protonets.maml.train import MetaConfig, load_meta_learner
    from protonets.maml.train import query_scores as accuracy
    from tests.conftest import EXAMPLES

    data, out, cache = str(EXAMPLES / "support"), tmp_path / "anil", str(tmp_path / "cache")
    args = ["train", "--method", "anil", "--freeze-encoder", "--dataset", "folder", "--data", data]
    args += ["--val-split", "none", "--episodes", "4", "--meta-batch", "2", "--ways", "3", "--shots", "1"]
    args += ["--queries", "2", "--cache-dir", cache, "--output", str(out), "--quiet"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2  # the folder holds a run; a frozen head cannot --resume, so no such advice
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--resume" not in err
    assert main([*args, "--overwrite"]) == 0  # a second run replaces the log, never appends to it
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [4]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["frozen_encoder"] and manifest["maml"]["frozen_encoder"]
    learner, encoder, config = load_meta_learner(out)
    assert learner.body is None and config.method == "anil"

    evaluate = [
        "eval",
        "--dataset",
        "folder",
        "--data",
        data,
        "--ways",
        "3",
        "--shots",
        "1",
        "--queries",
        "2",
    ]
    evaluate += ["--episodes", "5", "--checkpoint", str(out), "--cache-dir", cache, "--quiet"]
    evaluate += ["--method", "maml", "--output", str(tmp_path / "r.json")]
    calls = _spy_on_meta_episodes(monkeypatch)
    assert main(evaluate) == 0
    assert calls == [1]
    row = json.loads((tmp_path / "r.json").read_text())["results"][0]
    dataset = load_dataset("folder", data, None)
    batch = sample_episodes(dataset.labels, 3, 1, 2, 5, seed=0, class_names=dataset.class_names)
    emb = embed_dataset(dataset, encoder, cache_dir=cache, progress=False)
    tasks = episode_tasks(head_features(emb), torch.from_numpy(batch.indices), 1)
    expected = accuracy(learner, tasks, config.eval_inner_steps)[1].mean()
    assert row["accuracy"] == pytest.approx(float(expected), abs=1e-6)

    capsys.readouterr()
    assert main([*args[:2], "maml", *args[3:-3], "--output", str(tmp_path / "other"), "--quiet"]) != 0
    assert "use it with --method anil, siamese" in capsys.readouterr().err
    with pytest.raises(UserInputError, match="use --method anil with --freeze-encoder"):
        MetaConfig(method="fomaml", frozen_encoder=True)
    from protonets.eval.meta import MetaEpisodes
    from protonets.maml.train import create_meta_learner

    proto = create_meta_learner(None, 8, 3, MetaConfig(method="anil", frozen_encoder=True, proto_init=True))
    MetaEpisodes(proto, encoder, dataset.items).check_ways(4)  # Proto-MAML: any number of ways
    assert proto.with_ways(4).head.out_features == 4
    tied = create_meta_learner(
        None, 8, 3, MetaConfig(method="anil", frozen_encoder=True, proto_init=True, meta_sgd=True)
    )
    with pytest.raises(UserInputError, match="meta-trained for 3-way"):  # Meta-SGD head step sizes
        MetaEpisodes(tied, encoder, dataset.items).check_ways(4)


def test_a_proto_maml_learner_runs_tasks_of_any_width():
    """Proto-MAML starts the head at each task's prototypes, so a learner meta-trained 5-way
    answers 3-way tasks exactly as a 3-way learner with the same body; Meta-SGD head step
    sizes tie it to its width."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
    five = MetaLearner(nn.Linear(8, 5), body, steps=2, lr=0.3, proto_init="euclidean")
    three = MetaLearner(nn.Linear(8, 3), body, steps=2, lr=0.3, proto_init="euclidean")
    x = torch.randn(2, 6, 6)
    y = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 1, 0, 2, 1, 0]])
    q = torch.randn(2, 4, 6)
    assert five.any_ways
    state = torch.get_rng_state()
    wide = five.with_ways(3)
    assert torch.equal(torch.get_rng_state(), state)  # no random init of a head nobody reads
    assert wide.head.out_features == 3 and five.head.out_features == 5 and wide.body is five.body
    torch.testing.assert_close(wide.predict(x, y, q), three.predict(x, y, q))
    assert five.with_ways(5) is five
    tied = MetaLearner(nn.Linear(8, 5), body, proto_init="euclidean", meta_sgd=True)
    plain = MetaLearner(nn.Linear(8, 5), body)
    for learner in (tied, plain):
        assert not learner.any_ways
        with pytest.raises(ValueError, match="5-way"):
            learner.with_ways(3)
