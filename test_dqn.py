"""Tests for dqn.py: one small test per piece, then end-to-end runs. `python -m pytest -q` runs them all."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import dqn  # first: it routes MLX's matmuls to a fast BLAS, which works only before MLX is loaded

import gymnasium as gym  # noqa: E402
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

QUIET = dict(log=lambda *_: None)
IDENT = {"env": "CartPole-v1", "arch": "mlp", "num_actions": 2}


def tiny_args(tmp_path, env="CartPole-v1", *extra):
    flags = "--total-steps 400 --learning-starts 100 --batch-size 32 --buffer-size 1000 --eval-every 0"
    return dqn.parse_args(["--env", env, *flags.split(), "--run-dir", str(tmp_path / "run"), *extra])


def make_learner(seed=0, lr=1e-2, target_update=1):
    args = tiny_args(Path("/tmp"), "CartPole-v1", "--seed", str(seed), "--lr", str(lr),
                     "--target-update", str(target_update))
    return dqn.make_learner(dqn.Env("CartPole-v1", 1, train=True), args)


def batch(seed=0):  # CartPole-shaped: x (8, 2, 4) holds s and s'
    rng = np.random.default_rng(seed)
    x = mx.array(rng.normal(size=(8, 2, 4)).astype(np.float32))
    return x, mx.array(rng.integers(2, size=8)), mx.array(rng.normal(size=8).astype(np.float32)), mx.zeros(8)


def same(*models):
    flat = [[np.array(v) for _, v in tree_flatten(m.parameters())] for m in models]
    return all((a == b).all() for a, b in zip(flat[0], flat[1], strict=True))


def saved_meta(path):
    return json.loads(mx.load(str(path), return_metadata=True)[1]["dqn"])


class Countdown(gym.Env):
    """Pays 2 a step. Reset with seed s, a game lasts 1 + s % 10 steps (vector env i gets s + i), else 1 step.
    Observations are the steps left, / 10."""
    observation_space, action_space = gym.spaces.Box(0, 1, (4,), np.float32), gym.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        self.left = 1 + seed % 10 if seed is not None else 1
        return np.full(4, self.left / 10, np.float32), {}

    def step(self, action):
        self.left -= 1
        return np.full(4, self.left / 10, np.float32), 2.0, self.left == 0, False, {}


gym.register("Countdown-v0", entry_point=Countdown)
gym.register("CountdownCap-v0", entry_point=Countdown, max_episode_steps=3)


def test_blas_is_named_only_for_a_library_that_exports_sgemm():
    # CDLL(None) opens this program and libm loads fine: neither is a BLAS.
    assert dqn.load_blas([("A", None), ("B", "libno-such-blas.so"), ("C", "libm.so.6")]) is None
    if dqn.BLAS == "OpenBLAS":
        assert dqn.load_blas([("C", "libm.so.6"), ("OpenBLAS", "libopenblas.so.0")]) == "OpenBLAS"


def test_atari_defaults_are_the_papers_values_or_the_documented_deviations():
    args = dqn.parse_args(["--env", "ALE/Pong-v5"])
    paper = dict(total_steps=2_500_000, buffer_size=1_000_000, batch_size=32, gamma=0.99, eps_start=1.0,
                 eps_end=0.1, eps_decay_steps=1_000_000, learning_starts=50_000, train_freq=4,
                 target_update=10_000, eval_eps=0.05, eval_episodes=30, clip_rewards=True, arch="nips")
    assert {k: getattr(args, k) for k in paper} == paper
    assert args.lr == 1e-4 and args.seed == 1  # Adam's rate: in the docstring; seed 1 made the README's runs


@pytest.fixture
def cpu():
    """StridedConv is the CPU path's layer; on a CUDA GPU, float32 matmuls are TF32-rounded."""
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


@pytest.mark.parametrize("in_ch,out_ch,kernel,stride,size,first",
                         [(4, 32, 8, 4, 84, False), (4, 16, 8, 4, 84, True), (16, 32, 4, 2, 20, False),
                          (64, 64, 3, 1, 9, False)])
def test_strided_conv_and_its_gradient_equal_conv2d(in_ch, out_ch, kernel, stride, size, first, cpu):
    conv = dqn.StridedConv(in_ch, out_ch, kernel, stride, channels_first=first)
    bound = abs(nn.Conv2d(in_ch, out_ch, kernel).weight).max().item()  # uniform(-1/sqrt(in*k*k), ...)
    assert abs(abs(conv.weight).max().item() / bound - 1) < 0.01 and (conv.bias == 0).all().item()  # theirs
    conv.bias = mx.random.normal((out_ch,))
    x = mx.random.normal((2, size, size, in_ch))
    dy = mx.random.normal((2, (size - kernel) // stride + 1, (size - kernel) // stride + 1, out_ch))

    def grads(f):  # d(sum(f * dy)) / d(x, weight, bias)
        return mx.grad(lambda x, w, b: (f(x, w, b) * dy).sum(), argnums=(0, 1, 2))(x, conv.weight, conv.bias)

    def ours(x, w, b):  # x is channels-last; a channels-first layer reads it as (B, C, H, W)
        conv.update({"weight": w, "bias": b})
        return conv(x.transpose(0, 3, 1, 2) if first else x)

    def theirs(x, w, b):
        return mx.conv2d(x, w, stride=stride) + b

    assert mx.allclose(ours(x, conv.weight, conv.bias), theirs(x, conv.weight, conv.bias), atol=1e-4).item()
    for mine, expected in zip(grads(ours), grads(theirs), strict=True):  # block_conv's hand-written vjp
        assert mx.allclose(mine, expected, rtol=1e-4, atol=1e-4).item()


@pytest.mark.parametrize("arch,params", [("nips", 677_686), ("nature", 1_687_206)])
def test_atari_network_shapes_and_pixel_scale(arch, params):
    q, seen = dqn.AtariQNetwork(6, arch), []
    first = q.convs[0]
    q.convs[0] = lambda x: seen.append(x) or first(x)
    frames = np.random.default_rng(0).integers(0, 256, (3, 4, 84, 84), np.uint8)
    out = q(mx.array(frames))
    assert out.shape == (3, 6) and out.dtype == mx.float32
    expected = frames if q.on_cpu else frames.transpose(0, 2, 3, 1)  # GPU: nn.Conv2d's channels-last
    assert np.allclose(np.array(seen[0]), expected / 255.0)  # in [0, 1]
    q.convs[0] = first
    assert sum(v.size for _, v in tree_flatten(q.parameters())) == params  # nips: 663,808 in fc (2592x256)
    assert dqn.MLPQNetwork(4, 2)(mx.zeros((5, 1, 4))).shape == (5, 2)


def fill(replay, steps, value_of, terminated_at=()):
    """Feeds frame value_of(e, t) at step t; a terminal step is followed by a new game, as Env reports it."""
    n = replay.num_envs
    replay.start(np.array([[value_of(e, 0)] for e in range(n)]))
    new_game = np.zeros(n, bool)
    for t in range(1, steps):
        term = np.array([(e, t) in terminated_at for e in range(n)])
        frame = np.array([[value_of(e, t)] for e in range(n)])
        replay.add(np.full(n, t - 1), np.full(n, t - 1.0), term, frame, new_game)
        new_game = term


def all_samples(replay):
    """Every distinct transition the replay can return, keyed by the value of s_t's newest frame."""
    x, a, _, term = replay.sample(500, np.random.default_rng(0))
    return {int(row[-2, 0]): (row[:, 0].tolist(), int(a_), bool(t_))
            for row, a_, t_ in zip(x, a, term, strict=True)}


def test_replay_rebuilds_stacks_and_hides_previous_game():
    replay = dqn.Replay(8, 1, (1,), np.int64, stack=4)
    fill(replay, 6, lambda e, t: t + 1, terminated_at={(0, 3)})  # frame 4 ends a game; frame 5 starts one
    got = all_samples(replay)
    assert set(got) == {1, 2, 3, 5}  # no transition starts from the last frame of a game
    assert got[1] == ([0, 0, 0, 1, 2], 0, False)  # zeros before the first frame, as the env shows
    assert got[3] == ([0, 1, 2, 3, 4], 2, True)  # s' is the real terminal frame
    assert got[5] == ([0, 0, 0, 5, 6], 4, False)  # frames 2..4 belong to the previous game
    assert 7.0e9 < dqn.Replay.nbytes(1_000_000, (84, 84), np.uint8) < 7.2e9  # a million Atari transitions


def test_replay_wraps_around_keeps_envs_apart_and_bootstraps_at_time_limits():
    replay = dqn.Replay(8, 1, (1,), np.int64, stack=4)
    fill(replay, 13, lambda e, t: t + 1)  # 13 frames in 8 slots: frames 6..13 remain
    got = all_samples(replay)
    assert set(got) == {9, 10, 11, 12} and got[9][0] == [6, 7, 8, 9, 10]  # 6..8 lost their history
    replay = dqn.Replay(16, 2, (1,), np.int64, stack=4)
    fill(replay, 7, lambda e, t: 100 * e + t + 1, terminated_at={(1, 2)})
    got = all_samples(replay)
    assert all(f == 0 or f // 100 == newest // 100 for newest, (frames, _, _) in got.items() for f in frames)
    assert got[104][0] == [0, 0, 0, 104, 105]  # env 1 restarted at frame 104
    replay = dqn.Replay(8, 1, (1,), np.int64, stack=1)  # a time limit: game over without `terminated`
    fill(replay, 4, lambda e, t: t + 1)
    replay.add(np.array([0]), np.array([0.0]), np.array([False]), np.array([[9]]), np.array([True]))
    x, _, _, term = replay.sample(20, np.random.default_rng(0))
    assert set(map(tuple, x[:, :, 0].tolist())) == {(1, 2), (2, 3), (3, 4)} and not term.any()


def test_atari_run_writes_its_files_and_replays_the_stacks_the_agent_acted_on(tmp_path, monkeypatch):
    """The real loop on a real Atari env: 2 envs, a buffer that wraps 5 times, lives lost and games over."""
    seen, replays, real_act, real_replay = [], [], dqn.act, dqn.make_replay

    def act(q, obs, *args):  # training plays 2 envs, evaluation 3
        seen.extend([obs.copy()] if len(obs) == 2 else [])
        return real_act(q, obs, *args)

    monkeypatch.setattr(dqn, "act", act)
    monkeypatch.setattr(dqn, "make_replay", lambda *args: replays.append(real_replay(*args)) or replays[0])
    out = dqn.train(tiny_args(tmp_path, "ALE/Breakout-v5", "--num-envs", "2", "--buffer-size", "400",
                              "--total-steps", "2000", "--batch-size", "8", "--eval-every", "1000",
                              "--eval-episodes", "3"), **QUIET)
    run = tmp_path / "run"
    assert out["step"] == 2000 and [e["step"] for e in out["evals"]] == [1000, 2000]
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.csv", "eval.csv", "model.safetensors",
                                                "checkpoint.safetensors"}
    assert (run / "metrics.csv").read_text().startswith("step,episode,episodic_return,episode_length,epsilon")
    replay, checked = replays[0], 0
    for k in range(len(seen) - replay.slots + replay.stack, len(seen) - 1):  # step k wrote slot k % slots
        for e in range(2):
            if replay.valid[k % replay.slots, e]:
                x, _, _, _ = replay.gather(np.array([k % replay.slots]), np.array([e]))
                assert (x[0, :-1] == seen[k][e]).all() and (x[0, 1:] == seen[k + 1][e]).all()
                checked += 1
    assert checked > 300 and replay.terminated.sum() > 3 and replay.first.sum() >= 1  # inside the window


def test_progress_line_shows_steps_speed_games_return_epsilon_loss(tmp_path, monkeypatch):
    lines, clock = [], [0.0]
    monkeypatch.setattr(dqn.time, "time", lambda: clock[0])
    progress = dqn.Progress(tmp_path, 100, 0, 1, lines.append)  # a run resumed at step 100
    clock[0] = 4.9  # under 5 seconds: no line yet
    for g in range(25):  # game g scores g in one step; the next step starts a new game
        progress.record(100 + g, np.array([float(g)]), np.array([False]), 0.5)
        progress.record(100 + g, np.array([0.0]), np.array([True]), 0.5)
    progress.update(0.25, 2.0, 125)
    assert lines == []  # a line every 5 seconds at most
    clock[0] = 10.0
    progress.record(200, np.array([0.0]), np.array([False]), 0.5)
    # (200 - 100) steps in 10 s; the return is the mean of the last 20 games (5 .. 24).
    assert lines == ["step 200 | 10 sps | episodes 25 | return 14.5 | eps 0.500 | loss 0.2500 | q 2.000"]
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 25


def test_crossed_sees_multiples_that_parallel_envs_step_over():
    assert dqn.crossed(198, 201, 200) and dqn.crossed(199, 200, 200) and not dqn.crossed(200, 203, 200)
    assert not dqn.crossed(0, 10**6, 0)  # 0 = never


def test_epsilon_decays_from_learning_start():
    args = dqn.parse_args(["--env", "ALE/Pong-v5", "--learning-starts", "100", "--eps-decay-steps", "1000"])
    assert dqn.epsilon(0, args) == dqn.epsilon(100, args) == 1.0
    assert dqn.epsilon(600, args) == pytest.approx(0.55)
    assert dqn.epsilon(1100, args) == pytest.approx(0.1) == dqn.epsilon(10**9, args)


def test_act_is_greedy_at_zero_epsilon_random_at_one_and_follows_updates():
    q, target, opt = make_learner()
    step, q_act, x = dqn.make_train_step(q, target, opt, 0.99, False), dqn.compiled_q(q), batch()[0][:, 0]
    before = np.array(q_act(x))
    for i in range(3):
        step(*batch(i))
    assert not np.allclose(before, q(x)) and mx.allclose(q_act(x), q(x), atol=1e-6).item()  # not stale
    obs = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    greedy = np.array(mx.argmax(q(mx.array(obs)), axis=1))
    assert (dqn.act(q_act, obs, 0.0, np.random.default_rng(1), 2) == greedy).all()
    assert set(dqn.act(q_act, obs, 1.0, np.random.default_rng(1), 2).tolist()) == {0, 1}


def test_td_target_terminal_and_double():
    q_next = mx.array([[1.0, 3.0], [2.0, 5.0]])
    y = dqn.td_target(q_next, None, mx.array([1.0, 1.0]), mx.array([0.0, 1.0]), 0.5, double=False)
    assert y.tolist() == [1.0 + 0.5 * 3.0, 1.0]  # a terminal s' removes the bootstrap
    y = dqn.td_target(q_next, mx.array([[9.0, 0.0], [0.0, 9.0]]), mx.zeros(2), mx.zeros(2), 1.0, double=True)
    assert y.tolist() == [1.0, 5.0]  # the online net picks a', the target net values it


def test_adam_is_bias_corrected_and_flushes_tiny_moments():
    q, target, opt = make_learner(lr=1e-3)
    w0 = np.array(q.layers[0].weight)
    opt.update(q, tree_map(lambda p: mx.full(p.shape, 1e-4), q.parameters()))  # a small constant gradient g
    # The first step is lr * g / (|g| + eps) = 0.4 lr with bias correction and Rainbow's eps (0.065 lr without
    # the correction; the lr itself with PyTorch's default eps 1e-8).
    assert np.allclose(w0 - np.array(q.layers[0].weight), 0.4e-3, rtol=1e-3)
    ours, plain = dqn.make_optimizer(1e-3), dqn.optim.Adam(1e-3, eps=1.5e-4, bias_correction=True)
    params = []
    for opt in (ours, plain):  # moments about to become subnormal (below 1.2e-38), and ordinary ones
        opt.init({"w": mx.ones(4)})
        opt.state["w"] = {"m": mx.array([1.3e-38, 1e-3, 0, -2e-31]), "v": mx.array([1e-37, 1e-2, 0, 3e-31])}
        params.append(opt.apply_gradients({"w": mx.zeros(4)}, {"w": mx.ones(4)})["w"])
    assert mx.array_equal(params[0], params[1]).item()  # the same step for the weights
    assert ours.state["w"]["m"].tolist() == [0, plain.state["w"]["m"][1].item(), 0, 0]
    assert ours.state["w"]["v"].tolist() == [0, plain.state["w"]["v"][1].item(), 0, 0]
    assert 0 < abs(plain.state["w"]["m"][0].item()) < 1.2e-38  # what plain Adam keeps


def test_train_step_compiled_equals_eager_and_reads_the_synced_target():
    results, limits = [], []
    for compiled, limit in ((False, 1 << 20), (True, 1 << 30)):
        q, target, opt = make_learner()
        mx.set_cache_limit(limit)
        step = dqn.make_train_step(q, target, opt, 0.99, False, compile=compiled)
        limits.append(mx.set_cache_limit(128 << 20) >> 20)  # MiB of freed buffers kept for the next update
        losses = [step(*batch(i))[0].item() for i in range(3)]  # 3 steps: Adam's state must carry over
        results.append(losses + np.array(q(batch(9)[0][:, 0])).ravel().tolist())
    assert np.allclose(results[0], results[1], atol=1e-5) and limits == [128, 1024]  # raised, never lowered
    assert same(make_learner()[1], target) and not same(q, target)  # the target moved only with a sync
    dqn.sync_target(q, target)
    assert same(q, target)
    x, a, r, term = batch(6)  # the compiled step must read the *new* target weights
    y = dqn.td_target(target(x[:, 1:]), None, r, term, 0.99, False)
    q_values = q(x[:, :-1])
    q_sa = mx.take_along_axis(q_values, a[:, None], 1)[:, 0]
    expected = nn.losses.huber_loss(q_sa, y, reduction="mean"), q_values.max(axis=1).mean()  # loss, avg max Q
    got = step(x, a, r, term)
    assert all(mx.allclose(got[i], expected[i], atol=1e-5).item() for i in (0, 1))


def test_double_train_step_lets_the_online_net_choose_a_prime():
    (q, target, opt), other = make_learner(), make_learner(seed=5)[0]
    target.update(other.parameters())  # Q and Q^ now disagree on a'
    x, a, r, term = batch(3)
    choose_online, choose_target = (dqn.td_target(target(x[:, 1:]), net(x[:, 1:]), r, term, 0.99, True)
                                     for net in (q, target))
    assert not mx.allclose(choose_online, choose_target).item()
    q_sa = mx.take_along_axis(q(x[:, :-1]), a[:, None], 1)[:, 0]
    expected = nn.losses.huber_loss(q_sa, choose_online, reduction="mean")
    loss = dqn.make_train_step(q, target, opt, 0.99, True)(x, a, r, term)[0]
    assert mx.allclose(loss, expected, atol=1e-5).item()  # the tolerance of the compiled-step test above


def test_checkpoint_round_trip_keeps_the_new_lr_and_survives_a_failed_write(tmp_path, monkeypatch):
    q, target, opt = make_learner(lr=1e-3)
    dqn.make_train_step(q, target, opt, 0.99, False)(*batch(0))
    dqn.save_checkpoint(tmp_path, q, target, opt, IDENT, 7, 3, np.random.default_rng(0))

    def disk_full(path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")  # the write starts, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dqn.mx, "save_safetensors", disk_full)
    with pytest.raises(dqn.UserError, match="No space left"):
        dqn.save_checkpoint(tmp_path, *make_learner(seed=2), IDENT, 8, 0, np.random.default_rng(0))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors", "model.safetensors"]
    q2, target2, opt2 = make_learner(seed=1)
    meta = dqn.load_checkpoint(tmp_path / "checkpoint.safetensors", q2, target2, opt2, IDENT, lr=5e-5)
    assert meta["step"] == 7 and meta["full"] and opt2.learning_rate.item() == pytest.approx(5e-5)
    assert same(q, q2) and same(target, target2) and not same(q, target)
    assert opt2.state["step"].item() == 1 and (opt2.state["layers"][0]["weight"]["v"] > 0).any().item()
    q3 = dqn.MLPQNetwork(4, 2)  # model.safetensors is plain MLX weights
    q3.load_weights(str(tmp_path / "model.safetensors"))
    assert same(q, q3)
    q4, target4, opt4 = make_learner(seed=1, target_update=0)  # no target network: the target *is* Q
    dqn.load_checkpoint(tmp_path / "checkpoint.safetensors", q4, target4, opt4, IDENT, lr=1e-3)
    assert target4 is q4 and same(q, q4)
    q5, target5, opt5 = make_learner(seed=3)  # weights only: the target starts as their copy
    meta = dqn.load_checkpoint(tmp_path / "model.safetensors", q5, target5, opt5, IDENT, lr=1e-3)
    assert same(q, q5) and same(q5, target5) and not meta["full"]  # a new run: its own step 0 and run dir


def test_new_game_is_seen_at_time_limits_and_eval_has_no_life_loss():
    gym.register("BreakoutCap84-v0", entry_point="ale_py.env:AtariEnv",
                 kwargs=dict(game="breakout", max_num_frames_per_episode=84, repeat_action_probability=0.0))
    env = dqn.Env("BreakoutNoFrameskip-v4", 1, train=True)  # the agent's frame skip: 4 frames a step
    env.reset(seed=0)
    start = env.frame_number.copy()
    env.step(np.zeros(1, int))
    assert (env.frame_number - start).tolist() == [4]
    env = dqn.Env("BreakoutCap84-v0", 1, train=True)
    env.reset(seed=0)
    steps = [env.step(np.zeros(1, int)) for _ in range(40)]  # NOOP: the ball is never launched twice
    ended = next(i for i, (_, _, term, _) in enumerate(steps) if term[0])  # a life lost at the frame cap
    assert [s[3][0] for s in steps[:ended + 2]] == [False] * (ended + 1) + [True]
    assert (steps[ended + 1][0][0, :3] == 0).all()  # a fresh game: no frames before its first
    env = dqn.Env("CountdownCap-v0", 1, train=True)  # a 10-step game cut at 3 steps by its time limit
    env.reset(seed=9)
    assert [env.step(np.zeros(1, int))[3][0] for _ in range(5)] == [False, False, False, True, False]
    env, rng = dqn.Env("ALE/Breakout-v5", 1, train=False), np.random.default_rng(0)
    env.reset(seed=0)
    steps = [env.step(rng.integers(4, size=1))[2:] for _ in range(1500)]
    terminated, new_game = (np.array([s[i][0] for s in steps]) for i in (0, 1))
    assert new_game.sum() >= 2 and (new_game[1:] == terminated[:-1]).all()  # game overs only, no lost lives
    env.reset(seed=0)  # NOOP again: a life is lost, the ball is never relaunched, the game runs to its cap
    noop = [env.step(np.zeros(1, int))[2:] for _ in range(4501)]
    assert [i for i, (term, new) in enumerate(noop) if term[0] or new[0]] == [4500]  # 18,000 frames, 2015
    env = dqn.Env("ALE/Breakout-v5", 1, train=True)  # training games run on, to ALE's 108,000 frames
    env.reset(seed=0)
    assert not any(env.step(np.zeros(1, int))[3][0] for _ in range(4501))


@pytest.mark.parametrize("scale,flags,learned", [(5, [], 5.0), (5, ["--clip-rewards"], 1.0),
                                                  (-5, ["--clip-rewards"], -1.0)])
def test_rewards_are_clipped_on_atari_only(tmp_path, monkeypatch, scale, flags, learned):
    # CartPole paying `scale` per step: a classic task whose rewards clipping would change.
    gym.registry.pop("BigReward-v0", None)
    gym.register("BigReward-v0", entry_point=lambda: gym.wrappers.TransformReward(
        gym.make("CartPole-v1").unwrapped, lambda r: scale * r), max_episode_steps=500)
    added, real_add = [], dqn.Replay.add
    monkeypatch.setattr(dqn.Replay, "add", lambda self, a, r, *more: added.append(r) or real_add(self, a, r,
                                                                                              *more))
    dqn.train(tiny_args(tmp_path, "BigReward-v0", "--total-steps", "120", *flags), **QUIET)
    assert {float(r[0]) for r in added} == {learned, 0.0}  # 0: the steps that only start a new game
    rows = [r.split(",") for r in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    assert rows and all(float(r[2]) == scale * int(r[3]) for r in rows)  # the log keeps the real score
    # A step that only starts a new game is no agent step: game k ends at the sum of the first k lengths.
    assert [int(r[0]) for r in rows] == np.cumsum([int(r[3]) for r in rows]).tolist()
    assert dqn.parse_args(["--env", "ALE/Pong-v5"]).clip_rewards
    env, rng = dqn.Env("ALE/SpaceInvaders-v5", 1, train=True), np.random.default_rng(0)
    env.reset(seed=0)  # Atari's env reports the real score (5-30 an invader): the learner clips
    assert max(env.step(rng.integers(env.num_actions, size=1))[1][0] for _ in range(300)) > 1


def test_evaluate_scores_each_envs_first_game_with_eval_epsilon_in_its_own_env(monkeypatch):
    seen, envs, real_act, real_env = [], [], dqn.act, dqn.Env
    monkeypatch.setattr(dqn, "act", lambda q, obs, eps, *a: seen.append(eps) or real_act(q, obs, eps, *a))
    monkeypatch.setattr(dqn, "Env", lambda *a, **k: envs.append((a, k)) or real_env(*a, **k))
    returns = dqn.evaluate(dqn.MLPQNetwork(4, 2), "Countdown-v0", 3, seed=0, eps=0.25)
    assert returns.tolist() == [2, 4, 6]  # unclipped; env 0's later 1-step games are not counted
    assert set(seen) == {0.25} and envs == [(("Countdown-v0", 3), {"train": False})]


def test_evaluator_passes_eval_epsilon_and_logs_average_max_q(tmp_path, monkeypatch):
    seen, real_act = [], dqn.act
    monkeypatch.setattr(dqn, "act", lambda q, obs, eps, *a: seen.append(eps) or real_act(q, obs, eps, *a))
    args = tiny_args(tmp_path, "Countdown-v0", "--eval-episodes", "3", "--eval-eps", "0.5")

    def q(x):  # Q(s) = (s_0, -s_0), so max_a Q(s, a) = |s_0|
        return mx.concatenate([x[:, :1], -x[:, :1]], axis=1)

    evaluator = dqn.Evaluator(args, q, tmp_path, QUIET["log"], atari=False)
    row = evaluator(7)  # env i is seeded 1 + 1 + 7 + i (--seed, +1, step): games of 10, 1, 2 steps
    assert row["mean_return"] == pytest.approx(26 / 3) and row["episodes"] == 3
    assert row["std_return"] == pytest.approx(np.std([20, 2, 4]))
    assert set(seen) == {0.5} and evaluator.states.shape == (100, 4)
    assert row["avg_max_q"] == pytest.approx(np.abs(evaluator.states[:, 0]).mean()) and row["avg_max_q"] > 0
    assert (tmp_path / "eval.csv").read_text().splitlines()[1].startswith("7,")


@pytest.mark.parametrize("flags", [["--target-update", "0"], ["--double"], ["--num-envs", "3"],
                                   ["--train-freq", "2"]])
def test_variants_count_every_agent_step_and_same_seed_repeats(tmp_path, monkeypatch, flags):
    updates, real_update = [], dqn.Progress.update
    monkeypatch.setattr(dqn.Progress, "update", lambda self, *a: updates.append(a) or real_update(self, *a))
    outs = [dqn.train(tiny_args(tmp_path / d, "CartPole-v1", "--eval-every", "300", "--eval-episodes", "2",
                                *flags), **QUIET) for d in "ab"]
    loaded = [mx.load(str(out["run_dir"] / "model.safetensors")) for out in outs]
    assert all(mx.array_equal(loaded[0][k], loaded[1][k]).item() for k in loaded[0])
    out = outs[0]  # parallel envs advance the step by up to 3 at once: one evaluation at 300, one at the end
    assert 400 <= out["step"] < 403 and [e["step"] // 100 for e in out["evals"]] == [3, 4]
    rows = (out["run_dir"] / "metrics.csv").read_text().splitlines()[1:]
    assert out["episodes"] == len(rows) and sum(int(r.split(",")[3]) for r in rows) <= out["step"]
    # One update per --train-freq agent steps from step 100, however many steps a loop pass brings; 2 runs.
    every = int(flags[1]) if flags[0] == "--train-freq" else 1
    assert (out["step"] - 102) / every <= len(updates) / 2 <= (out["step"] - 99) / every


def test_resume_continues_step_epsilon_target_and_files(tmp_path, monkeypatch):
    dqn.train(tiny_args(tmp_path, "CartPole-v1", "--total-steps", "450"), **QUIET)  # target synced at 400
    monkeypatch.chdir(tmp_path)
    lines, checkpoint = [], str(tmp_path / "run" / "checkpoint.safetensors")
    args = tiny_args(tmp_path, "CartPole-v1", "--total-steps", "700", "--load", checkpoint)
    args.run_dir = None  # resumes into the checkpoint's own directory
    saved_rng, states, seeds, syncs = saved_meta(checkpoint)["rng"], [], [], []
    real_act, real_reset, real_sync = dqn.act, dqn.Env.reset, dqn.sync_target
    monkeypatch.setattr(dqn, "act", lambda q, o, e, rng, n: states.append(rng.bit_generator.state) or
                        real_act(q, o, e, rng, n))
    monkeypatch.setattr(dqn.Env, "reset", lambda self, seed: seeds.append(seed) or real_reset(self, seed))
    monkeypatch.setattr(dqn, "sync_target", lambda q, t: syncs.append(len(states)) or real_sync(q, t))
    out = dqn.train(args, log=lines.append)
    assert states[0] == saved_rng  # the random stream goes on where it stopped
    assert seeds[0] == 1 + 450  # new games, not the first run's again
    # make_learner's copy, then one sync: the saved target serves until step 650 (>= 200 loop passes on).
    assert len(syncs) == 2 and syncs[1] >= 200
    assert lines[0].startswith("env CartPole-v1: 2 actions") and "\nresumed at step 450" in lines[0]
    assert 700 <= out["step"] < 710
    assert out["run_dir"] == tmp_path / "run" and not (tmp_path / "runs").exists()
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows.count(rows[0]) == 1 and int(rows[-1].split(",")[0]) > 450  # one header, appended rows
    assert [int(r.split(",")[1]) for r in rows[1:]] == list(range(1, len(rows)))  # games numbered on
    assert max(float(r.split(",")[4]) for r in rows[1:]) <= 1.0 and dqn.epsilon(450, args) < 1.0
    eval_only = ["--env", "CartPole-v1", "--eval-only", "--eval-episodes=2", "--load", checkpoint]
    assert dqn.main([*eval_only, "--arch", "nature"]) == 0  # --arch is Atari's: an MLP checkpoint still loads
    evals = (tmp_path / "run" / "eval.csv").read_text().splitlines()  # --eval-only adds to the run's own file
    assert len(evals) == 2 and evals[1].startswith(f"{out['step']},") and evals[1].split(",")[3] == "2"


def test_benchmark_prints_each_part(capsys):
    argv = "--env CartPole-v1 --total-steps 300 --learning-starts 100 --batch-size 32 --buffer-size 1000"
    assert dqn.main(["--benchmark", *argv.split()]) == 0
    out = capsys.readouterr().out
    parts = ("environment alone", "update alone (mlp)", "end to end: 300 agent steps")
    assert all(part in out for part in parts), out
    rows = dqn.layer_profile(dqn.AtariQNetwork(4, "nature"), mx.zeros((2, 4, 84, 84), mx.uint8))
    assert [r[0] for r in rows] == ["conv1", "conv2", "conv3", "fc", "out"]
    assert all(forward > 0 and backward > 0 for _, forward, backward in rows)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    real = dqn.make_train_step
    monkeypatch.setattr(dqn, "make_train_step", lambda *a, **k: lambda *b: (real(*a, **k)(*b)[0] * np.nan,
                                                                             mx.array(0.0)))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(dqn.UserError, match=r"loss became nan \(Q 0.0\) at step 100; the last good"):
        dqn.train(tiny_args(tmp_path, "CartPole-v1", "--save-every", "30"), **QUIET)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # given back
    assert saved_meta(tmp_path / "run" / "checkpoint.safetensors")["step"] == 90


def test_run_table_plot_and_a_missing_package(tmp_path, capsys, monkeypatch):
    games = "".join(f"{10 * i},{i},{i}\n" for i in range(1, 151))  # game i scores i at step 10 i
    (tmp_path / "metrics.csv").write_text("step,episode,episodic_return\n" + games)
    (tmp_path / "eval.csv").write_text("step,mean_return,std_return\n500,7.5,1.0\n1500,9,0\n")
    assert dqn.run_table(tmp_path) == ["step 500 | eval return 7.5 +- 1.0 | training, last 100: 25.5",
                                       "step 1,500 | eval return 9.0 +- 0.0 | training, last 100: 100.5"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: refused before training
    assert dqn.main(["--env", "CartPole-v1", "--plot", "--run-dir", str(tmp_path / "never")]) == 2
    assert "needs the package matplotlib: pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert dqn.plot_run(tmp_path).exists()  # CSV files without every column (older runs) still plot
    dqn.train(tiny_args(tmp_path, "CartPole-v1", "--eval-every", "200", "--plot"), **QUIET)
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cartpole_learns_with_default_flags(tmp_path):
    """The README's promise: CartPole-v1 with the defaults reaches an evaluation mean of 195 in 50k steps."""
    out = dqn.train(dqn.parse_args(["--env", "CartPole-v1", "--run-dir", str(tmp_path / "run")]), **QUIET)
    assert out["step"] == 50_000 and max(e["mean_return"] for e in out["evals"]) >= 195, out["evals"]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_resumable_checkpoint(tmp_path, sig, code):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, str(Path(__file__).parent / "dqn.py"), "--env", "CartPole-v1",
                          "--total-steps", "10000000", "--save-every", "0", "--eval-every", "0",
                          "--run-dir", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (run / "metrics.csv").exists():
        time.sleep(0.2)
    time.sleep(2)  # let it play and learn a little
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code and "Traceback" not in err and "checkpoint saved" in out, err
    saved = saved_meta(run / "checkpoint.safetensors")
    assert saved["step"] > 0 and saved["episodes"] == len((run / "metrics.csv").read_text().splitlines()) - 1


def test_banner_names_the_blas_or_says_how_to_get_one(monkeypatch, cpu):
    env = dqn.Env("CartPole-v1", 1, train=True)
    for blas, hint in (("MKL", False), (None, True)):
        monkeypatch.setattr(dqn, "BLAS", blas)
        line = dqn.banner(env, tiny_args(Path("/tmp")), "run", 0)
        assert f"BLAS {blas or 'reference (slow)'} |" in line and (dqn.BLAS_HINT in line) == hint


def test_memory_and_peak_rss_are_bytes():
    physical = dqn.os.sysconf("SC_PAGE_SIZE") * dqn.os.sysconf("SC_PHYS_PAGES")
    assert 100e6 < dqn.memory_available() <= physical  # kilobytes read as bytes would be 1,000x too small
    assert 50e6 < dqn.peak_rss() < physical  # this process holds MLX, gymnasium and numpy


IMAGE = gym.spaces.Box(0, 255, (32, 32, 3), np.uint8)  # an image task that is not Atari: refused
gym.register("ImageTask-v0", entry_point=type("ImageTask", (gym.Env,), dict(
    observation_space=IMAGE, action_space=gym.spaces.Discrete(2))))


def needs_box2d():  # what LunarLander-v3 raises without its optional package
    raise gym.error.DependencyNotInstalled("Box2D is not installed")


gym.register("NeedsBox2D-v0", entry_point=needs_box2d)


def run_main(capsys, *argv):
    try:
        code = dqn.main(list(argv))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--env", "ALE/Pacmn-v5"], "unknown environment id 'ALE/Pacmn-v5'; did you mean ALE/Pacman-v5?"),
    (["--env", "Pendulum-v1"], "DQN needs discrete actions"),
    (["--env", "ImageTask-v0"], "supported are Atari games and tasks with a flat vector observation"),
    (["--env", "CartPole-v1", "--batch-size", "100", "--buffer-size", "50"], "argument --batch-size"),
    (["--plot-run", "/no/such/run"], "/no/such/run holds no metrics.csv"),
    (["--env", "CartPole-v1", "--learning-starts", "10"], "argument --learning-starts"),
    (["--env", "ALE/Pong-v5", "--buffer-size", "10000000"], "needs 70.7 GB but 8.0 GB is available"),
    (["--env", "CartPole-v1", "--eval-only"], "argument --load"),
    (["--env", "CartPole-v1", "--load", "/no/such.safetensors"], "no such file"),
    (["--env", "NeedsBox2D-v0"], "cannot create NeedsBox2D-v0: Box2D is not installed"),
    pytest.param(["--env", "CartPole-v1", "--device", "gpu"], "argument --device: gpu: MLX has no GPU",
                 marks=pytest.mark.skipif(mx.is_available(mx.gpu), reason="this machine has a GPU")),
    (["--env", "CartPole-v1", "--buffer-size", "4", "--num-envs", "2", "--batch-size", "2",
      "--learning-starts", "2"], "--buffer-size 4 leaves fewer than 3 slots per env"),
])
def test_bad_input_is_one_line(capsys, monkeypatch, tmp_path, argv, message):
    monkeypatch.setattr(dqn, "memory_available", lambda: 8e9)  # the same answer on any machine
    code, err = run_main(capsys, *argv, "--run-dir", str(tmp_path / "run"))
    assert code == 2 and message in err and err.count("\n") == 1, err  # one line: no usage, no traceback
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_every_flag_refuses_impossible_values(capsys, tmp_path):
    run = str(tmp_path / "run")
    bad = {"0": "total-steps buffer-size batch-size lr eps-decay-steps train-freq num-envs eval-episodes",
           "1.5": "gamma eps-start eps-end eval-eps", "-1": "target-update eval-every save-every"}
    for value, flags in bad.items():
        for flag in flags.split():
            code, err = run_main(capsys, "--env", "CartPole-v1", f"--{flag}", value, "--run-dir", run)
            assert code == 2 and err.startswith(f"dqn.py: error: argument --{flag}: must be"), err
            assert err.count("\n") == 1 and not Path(run).exists()  # one line, nothing written


def test_load_run_dir_and_interrupt_errors_are_one_line(tmp_path, capsys, monkeypatch):
    q, target, opt = make_learner()
    dqn.save_checkpoint(tmp_path, q, target, opt, IDENT, 1, 0, np.random.default_rng(0))
    (tmp_path / "junk.safetensors").write_text("not a checkpoint")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:3000])
    acrobot = json.dumps({"env": "Acrobot-v1", "arch": "mlp", "num_actions": 3})  # right id, wrong weights
    mx.save_safetensors(str(tmp_path / "shapes.safetensors"), {"fc.weight": mx.zeros(2)}, {"dqn": acrobot})
    unreadable, other = "not a readable safetensors file", "saved for env=CartPole-v1, arch=mlp, num_actions"
    for name, message in [("junk", unreadable), ("cut", unreadable), ("checkpoint", other),
                          ("shapes", "does not match the network")]:
        path = str(tmp_path / f"{name}.safetensors")
        code, err = run_main(capsys, "--env", "Acrobot-v1", "--eval-only", "--load", path)
        assert code == 2 and message in err and path in err and "Traceback" not in err, err
    code, err = run_main(capsys, "--env", "CartPole-v1", "--run-dir", str(tmp_path / "cut.safetensors" / "x"))
    assert code == 1 and err.startswith("dqn.py: error: run dir") and "Traceback" not in err

    def ctrl_c(*args, **kwargs):  # Ctrl-C while the environments are set up, before the loop's own handler
        raise KeyboardInterrupt

    monkeypatch.setattr(dqn, "Env", ctrl_c)
    assert run_main(capsys, "--env", "CartPole-v1") == (130, "dqn.py: error: interrupted\n")
