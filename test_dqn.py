"""Tests for dqn.py: one small test per piece, then end-to-end runs. `pytest -q` runs them all (~3 min)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dqn  # first: it routes MLX's matmuls to OpenBLAS, which works only before MLX is loaded

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

HERE = Path(__file__).parent


def run_cli(*args, timeout=120):
    """Runs dqn.py as a user would; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, str(HERE / "dqn.py"), *args], capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def tiny_atari_args(tmp_path, *extra):
    return dqn.parse_args(["--env", "ALE/Breakout-v5", "--total-steps", "300", "--learning-starts", "100",
                           "--buffer-size", "1000", "--batch-size", "8", "--eval-every", "0",
                           "--run-dir", str(tmp_path / "run"), *extra])


def tiny_cartpole_args(tmp_path, *extra):
    return dqn.parse_args(["--env", "CartPole-v1", "--total-steps", "400", "--learning-starts", "100",
                           "--batch-size", "32",
                           "--eval-every", "0", "--run-dir", str(tmp_path / "run"), *extra])


# ------------------------------------------------------------------------------------------- networks
@pytest.mark.parametrize("in_ch,out_ch,kernel,stride,size", [(4, 16, 8, 4, 84), (16, 32, 4, 2, 20)])
def test_strided_conv_equals_conv2d(in_ch, out_ch, kernel, stride, size):
    conv = dqn.StridedConv(in_ch, out_ch, kernel, stride)
    x = mx.random.normal((2, size, size, in_ch))
    expected = mx.conv2d(x, conv.weight, stride=stride) + conv.bias
    assert conv(x).shape == expected.shape
    assert mx.allclose(conv(x), expected, atol=1e-4).item()


@pytest.mark.parametrize("arch,params", [("nips", 677_686), ("nature", 1_687_206)])
def test_atari_network_shapes(arch, params):
    q = dqn.AtariQNetwork(6, arch)
    out = q(mx.array(np.full((3, 4, 84, 84), 255, np.uint8)))
    assert out.shape == (3, 6) and out.dtype == mx.float32
    n = sum(v.size for _, v in tree_flatten(q.parameters()))
    assert n == params  # nips: 4,112 + 8,224 + 663,808 (2592*256+256) + 1,542 (256*6+6)


def test_network_scales_pixels_to_unit_range():
    q = dqn.AtariQNetwork(2, "nips")
    img = np.random.default_rng(0).integers(0, 256, (1, 4, 84, 84), dtype=np.uint8)
    as_float = mx.array(img.astype(np.float32))  # the same pixels as float: identical output
    assert mx.allclose(q(mx.array(img)), q(as_float)).item()


def test_mlp_network_shapes():
    q = dqn.MLPQNetwork(4, 2)
    assert q(mx.zeros((5, 1, 4))).shape == (5, 2)
    assert q(mx.zeros((5, 4))).shape == (5, 2)


# ------------------------------------------------------------------------------------------- replay
def fill(replay, steps, value_of, terminated_at=(), reset_after_terminal=True):
    """Drives a Replay like the training loop does: frame value_of(e, t) at agent step t for env e."""
    n = replay.num_envs
    replay.start(np.array([[value_of(e, 0)] for e in range(n)]))
    was_done = np.zeros(n, bool)
    for t in range(1, steps):
        term = np.array([(e, t) in terminated_at for e in range(n)])
        frame = np.array([[value_of(e, t)] for e in range(n)])
        replay.add(np.full(n, t - 1), np.full(n, float(t - 1)), term, frame, was_done)
        was_done = term if reset_after_terminal else np.zeros(n, bool)


def all_samples(replay):
    """Every distinct transition the replay can return, keyed by the value of s_t's newest frame."""
    x, a, _, term = replay.sample(500, np.random.default_rng(0))
    return {int(row[-2, 0]): (row[:, 0].tolist(), int(ai), bool(ti)) for row, ai, ti in zip(x, a, term, strict=True)}


def test_replay_rebuilds_stacks_and_hides_previous_episode():
    replay = dqn.Replay(8, 1, (1,), np.int64, stack=4)
    # Frames 1..6; the step that shows frame 4 is terminal; frame 5 starts a new episode.
    fill(replay, 6, lambda e, t: t + 1, terminated_at={(0, 3)})
    got = all_samples(replay)
    assert set(got) == {1, 2, 3, 5}  # frame 4 ended the episode: no transition starts from it
    assert got[1] == ([0, 0, 0, 1, 2], 0, False)  # zeros before the first frame, as the env shows
    assert got[3] == ([0, 1, 2, 3, 4], 2, True)  # s' is the real terminal frame
    assert got[5] == ([0, 0, 0, 5, 6], 4, False)  # frames 2..4 belong to the previous episode


def test_replay_wraps_around_and_skips_overwritten_history():
    replay = dqn.Replay(8, 1, (1,), np.int64, stack=4)
    fill(replay, 13, lambda e, t: t + 1)  # 13 frames in 8 slots: frames 6..13 remain
    assert len(replay) == 8
    got = all_samples(replay)
    # 6, 7, 8 lost their history to the overwrite; 13 has no successor yet.
    assert set(got) == {9, 10, 11, 12}
    assert got[9][0] == [6, 7, 8, 9, 10]
    assert got[12][0] == [9, 10, 11, 12, 13]


def test_replay_keeps_parallel_envs_apart():
    replay = dqn.Replay(16, 2, (1,), np.int64, stack=4)
    fill(replay, 7, lambda e, t: 100 * e + t + 1, terminated_at={(1, 2)})
    for newest, (frames, _, _) in all_samples(replay).items():
        env = newest // 100
        assert all(f == 0 or f // 100 == env for f in frames), frames
    assert all_samples(replay)[104][0] == [0, 0, 0, 104, 105]  # env 1 restarted at frame 104


def test_replay_truncation_still_bootstraps():
    # A time limit ends the game (next step is a reset) without terminated: the last transition is
    # kept with terminated=False, so its target bootstraps from the real last observation.
    replay = dqn.Replay(8, 1, (1,), np.int64, stack=1)
    replay.start(np.array([[1]]))
    replay.add(np.array([0]), np.array([1.0]), np.array([False]), np.array([[2]]), np.array([False]))
    replay.add(np.array([0]), np.array([0.0]), np.array([False]), np.array([[3]]), np.array([True]))
    x, a, r, term = replay.sample(10, np.random.default_rng(0))
    assert (x[:, :, 0] == [1, 2]).all() and not term.any()


def test_replay_memory_for_one_million_atari_transitions():
    assert 7.0e9 < dqn.Replay.nbytes(1_000_000, (84, 84), np.uint8) < 7.2e9


# ------------------------------------------------------------------------------------------- epsilon, act
def test_epsilon_schedule():
    assert dqn.epsilon(0, 1.0, 0.1, 1000) == 1.0
    assert dqn.epsilon(500, 1.0, 0.1, 1000) == pytest.approx(0.55)
    assert dqn.epsilon(1000, 1.0, 0.1, 1000) == pytest.approx(0.1)
    assert dqn.epsilon(10**9, 1.0, 0.1, 1000) == pytest.approx(0.1)


def test_act_is_greedy_at_zero_epsilon_and_random_at_one():
    q = dqn.MLPQNetwork(3, 4)
    obs = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    greedy = np.array(mx.argmax(q(mx.array(obs)), axis=1))
    assert (dqn.act(q, obs, 0.0, np.random.default_rng(1), 4) == greedy).all()
    random_actions = dqn.act(q, obs, 1.0, np.random.default_rng(1), 4)
    assert set(random_actions.tolist()) == {0, 1, 2, 3}


def test_compiled_q_follows_weight_updates():
    q, target, opt, step = make_learner(True)
    q_act, x = dqn.compiled_q(q), batch(0)[0][:, 0]
    assert mx.allclose(q_act(x), q(x)).item()
    for i in range(3):
        step(*batch(i))
    assert mx.allclose(q_act(x), q(x), atol=1e-6).item()  # the new weights, not the ones first traced


# ------------------------------------------------------------------------------------------- learning step
def test_td_target_terminal_removes_bootstrap():
    q_next = mx.array([[1.0, 3.0], [2.0, 5.0]])
    y = dqn.td_target(q_next, None, mx.array([1.0, 1.0]), mx.array([0.0, 1.0]), 0.5, double=False)
    assert y.tolist() == [1.0 + 0.5 * 3.0, 1.0]


def test_double_dqn_target_uses_online_argmax():
    q_target = mx.array([[1.0, 3.0]])
    q_online = mx.array([[9.0, 0.0]])  # online net picks action 0, valued by the target net at 1.0
    y = dqn.td_target(q_target, q_online, mx.array([0.0]), mx.array([0.0]), 1.0, double=True)
    assert y.tolist() == [1.0]


def make_learner(compile, seed=0):
    mx.random.seed(seed)
    q, target = dqn.MLPQNetwork(3, 2), dqn.MLPQNetwork(3, 2)
    dqn.sync_target(q, target)
    opt = optim.Adam(learning_rate=1e-2)
    opt.init(q.trainable_parameters())
    return q, target, opt, dqn.make_train_step(q, target, opt, 0.99, False, compile=compile)


def batch(seed=0):
    rng = np.random.default_rng(seed)
    x = mx.array(rng.normal(size=(8, 2, 3)).astype(np.float32))
    return x, mx.array(rng.integers(2, size=8)), mx.array(rng.normal(size=8).astype(np.float32)), mx.zeros(8)


def test_compiled_step_equals_eager_step():
    results = []
    for compiled in (True, False):
        q, target, opt, step = make_learner(compiled)
        losses = [step(*batch(i))[0].item() for i in range(3)]  # 3 steps: Adam's state must carry over
        results.append((losses, q(batch(9)[0][:, 0])))
    assert np.allclose(results[0][0], results[1][0], atol=1e-5)
    assert mx.allclose(results[0][1], results[1][1], atol=1e-5).item()


def test_target_changes_only_on_sync():
    q, target, opt, step = make_learner(True)
    before = [np.array(v) for _, v in tree_flatten(target.parameters())]
    for i in range(3):
        step(*batch(i))
        mx.eval(q.state, opt.state)
    after = [np.array(v) for _, v in tree_flatten(target.parameters())]
    assert all((b == a).all() for b, a in zip(before, after, strict=True))
    assert not mx.allclose(q.layers[0].weight, target.layers[0].weight).item()
    dqn.sync_target(q, target)
    assert mx.array_equal(q.layers[0].weight, target.layers[0].weight).item()
    # The compiled step must read the *new* target weights, not the ones it first saw.
    x, a, r, term = batch(6)
    y = dqn.td_target(target(x[:, 1:]), None, r, term, 0.99, False)
    expected = nn.losses.huber_loss(mx.take_along_axis(q(x[:, :-1]), a[:, None], 1)[:, 0], y, reduction="mean")
    assert mx.allclose(step(x, a, r, term)[0], expected, atol=1e-5).item()


# ------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path):
    q, target, opt, step = make_learner(True)
    step(*batch(0))
    mx.eval(q.state, opt.state)
    meta = {"env": "X", "arch": "mlp", "num_actions": 2, "step": 7}
    dqn.save_checkpoint(tmp_path, q, target, opt, meta)
    q2, target2, opt2, _ = make_learner(True, seed=1)
    got = dqn.load_checkpoint(tmp_path / "checkpoint.safetensors", q2, target2, opt2,
                              {"env": "X", "arch": "mlp", "num_actions": 2})
    assert got["step"] == 7
    x = batch(3)[0][:, 0]
    assert mx.array_equal(q(x), q2(x)).item() and mx.array_equal(target(x), target2(x)).item()
    state, state2 = dict(tree_flatten(opt.state)), dict(tree_flatten(opt2.state))
    assert state.keys() == state2.keys() and all(mx.array_equal(state[k], state2[k]).item() for k in state)
    # model.safetensors is plain MLX weights
    q3 = dqn.MLPQNetwork(3, 2)
    q3.load_weights(str(tmp_path / "model.safetensors"))
    assert mx.array_equal(q(x), q3(x)).item()


def test_load_rejects_other_network(tmp_path):
    q, target, opt, _ = make_learner(True)
    dqn.save_checkpoint(tmp_path, q, target, opt, {"env": "X", "arch": "nature", "num_actions": 9})
    with pytest.raises(dqn.UserError, match="arch=nature, num_actions=9.*arch=nips, num_actions=4"):
        dqn.load_checkpoint(tmp_path / "checkpoint.safetensors", q, target, opt,
                            {"env": "X", "arch": "nips", "num_actions": 4})


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    q, target, opt, _ = make_learner(True)
    meta = {"env": "X", "arch": "mlp", "num_actions": 2, "step": 1}
    dqn.save_checkpoint(tmp_path, q, target, opt, meta)

    def disk_full(path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")  # the write starts, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dqn.mx, "save_safetensors", disk_full)
    with pytest.raises(dqn.UserError, match="No space left"):
        dqn.save_checkpoint(tmp_path, q, target, opt, dict(meta, step=2))
    monkeypatch.undo()
    got = dqn.load_checkpoint(tmp_path / "checkpoint.safetensors", q, target, opt,
                              {"env": "X", "arch": "mlp", "num_actions": 2})
    assert got["step"] == 1 and sorted(os.listdir(tmp_path)) == ["checkpoint.safetensors", "model.safetensors"]


# ------------------------------------------------------------------------------------------- evaluation
def test_evaluate_uses_eval_epsilon_and_its_own_env(monkeypatch):
    seen = []
    real_act, real_env = dqn.act, dqn.Env
    monkeypatch.setattr(dqn, "act", lambda q, obs, eps, rng, n: seen.append(eps) or real_act(q, obs, eps, rng, n))
    envs = []
    monkeypatch.setattr(dqn, "Env", lambda *a, **k: envs.append((a, k)) or real_env(*a, **k))
    returns = dqn.evaluate(dqn.MLPQNetwork(4, 2), "CartPole-v1", 3, seed=0)
    assert len(returns) == 3 and (returns >= 8).all()  # CartPole scores 1 per step; it cannot end sooner
    assert set(seen) == {0.05} and envs == [(("CartPole-v1", 3), {"train": False})]


def test_atari_eval_env_has_no_life_loss_signal():
    env = dqn.Env("ALE/Breakout-v5", 1, train=False)
    env.reset(seed=0)
    lives_lost, rng = 0, np.random.default_rng(0)
    for _ in range(2000):
        _, _, terminated, _, done = env.step(rng.integers(4, size=1))
        assert terminated[0] == done[0]  # only game over ends an evaluation episode
        lives_lost += done[0]
    env.close()
    assert lives_lost >= 1


# ------------------------------------------------------------------------------------------- end to end
def test_atari_end_to_end_writes_files(tmp_path):
    args = tiny_atari_args(tmp_path, "--eval-every", "200", "--eval-episodes", "2")
    out = dqn.train(args, log=lambda *_: None)
    run = tmp_path / "run"
    assert out["step"] >= 300 and len(out["losses"]) > 10 and np.isfinite(out["losses"]).all()
    assert {"config.json", "metrics.csv", "eval.csv", "model.safetensors", "checkpoint.safetensors"} <= set(
        os.listdir(run))
    assert json.loads((run / "config.json").read_text())["env"] == "ALE/Breakout-v5"
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,episode,episodic_return,episode_length,epsilon,loss,avg_max_q"
    assert (run / "eval.csv").read_text().splitlines()[0] == "step,mean_return,std_return,episodes,avg_max_q"


def test_parallel_envs_count_every_agent_step(tmp_path):
    out = dqn.train(tiny_cartpole_args(tmp_path, "--num-envs", "3", "--eval-every", "200", "--eval-episodes", "2"),
                    log=lambda *_: None)
    assert 400 <= out["step"] < 403
    steps = [e["step"] for e in out["evals"]]
    assert len(steps) == len(set(steps)) == 2  # at 200 and at 400 (+ up to 2): the final one is not repeated
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    lengths = sum(int(r.split(",")[3]) for r in rows)
    assert out["episodes"] == len(rows) and lengths <= out["step"]  # finished games account for steps taken


@pytest.mark.parametrize("flags", [["--target-update", "0"], ["--double"]])
def test_2013_and_double_dqn_variants_train(tmp_path, flags):
    out = dqn.train(tiny_cartpole_args(tmp_path, *flags), log=lambda *_: None)
    assert 299 <= len(out["losses"]) <= 301 and np.isfinite(out["losses"]).all()  # one update per step from 100


def test_same_seed_gives_identical_losses(tmp_path):
    first = dqn.train(tiny_cartpole_args(tmp_path / "a"), log=lambda *_: None)["losses"]
    second = dqn.train(tiny_cartpole_args(tmp_path / "b"), log=lambda *_: None)["losses"]
    assert len(first) >= 100 and first[:100] == second[:100]


def test_resume_continues_step_and_epsilon(tmp_path):
    dqn.train(tiny_cartpole_args(tmp_path), log=lambda *_: None)
    lines = []
    out = dqn.train(tiny_cartpole_args(tmp_path, "--total-steps", "700", "--load",
                                       str(tmp_path / "run" / "checkpoint.safetensors")), log=lines.append)
    assert any("resumed at step 400" in line for line in lines)
    assert 700 <= out["step"] < 710
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    eps_after = [float(r.split(",")[4]) for r in rows if int(r.split(",")[0]) > 400]
    assert eps_after and max(eps_after) < dqn.epsilon(400, 1.0, 0.05, 10_000) + 1e-9  # did not restart at 1.0


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    real = dqn.make_train_step

    def poisoned(*a, **k):
        step = real(*a, **k)
        return lambda *b: (step(*b)[0] * mx.array(float("nan")), mx.array(0.0))

    monkeypatch.setattr(dqn, "make_train_step", poisoned)
    with pytest.raises(dqn.UserError, match=r"loss became nan \(Q 0.0\) at step 100; the last good checkpoint"):
        dqn.train(tiny_cartpole_args(tmp_path, "--save-every", "30"), log=lambda *_: None)
    meta = json.loads(mx.load(str(tmp_path / "run" / "checkpoint.safetensors"), return_metadata=True)[1]["dqn"])
    assert meta["step"] == 90  # the NaN came at the first update (step 100): the last save stays


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    dqn.train(tiny_cartpole_args(tmp_path, "--eval-every", "200", "--plot"), log=lambda *_: None)
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cartpole_learns_with_default_flags(tmp_path):
    """The README's promise: CartPole-v1 with the defaults reaches an evaluation average of 195 in 50k steps."""
    out = dqn.train(dqn.parse_args(["--env", "CartPole-v1", "--run-dir", str(tmp_path / "run")]),
                    log=lambda *_: None)
    best = max(e["mean_return"] for e in out["evals"])
    assert out["step"] == 50_000 and best >= 195, [e["mean_return"] for e in out["evals"]]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_resumable_checkpoint(tmp_path, sig, code):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, str(HERE / "dqn.py"), "--env", "CartPole-v1", "--total-steps",
                          "10000000", "--save-every", "0", "--eval-every", "0", "--run-dir", str(run)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (run / "metrics.csv").exists():
        time.sleep(0.2)
    time.sleep(2)  # let it play and learn a little
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert "Traceback" not in err and "checkpoint saved" in out
    episodes = len((run / "metrics.csv").read_text().splitlines()) - 1
    lines = []
    args = tiny_cartpole_args(tmp_path, "--total-steps", "100000000", "--load", str(run / "checkpoint.safetensors"))
    saved = json.loads(mx.load(args.load, return_metadata=True)[1]["dqn"])
    args.total_steps = saved["step"] + 50
    out = dqn.train(args, log=lines.append)
    assert any(f"resumed at step {saved['step']:,}" in line for line in lines)
    assert saved["step"] > 0 and out["episodes"] >= saved["episodes"] == episodes  # metrics were flushed


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv,message", [
    (["--env", "ALE/NoSuchGame-v5"], "unknown environment id 'ALE/NoSuchGame-v5'"),
    (["--env", "ALE/Pacmn-v5"], "did you mean ALE/Pacman-v5?"),
    (["--env", "Pendulum-v1"], "DQN needs discrete actions"),
    (["--env", "CartPole-v1", "--total-steps", "0"], "argument --total-steps"),
    (["--env", "CartPole-v1", "--batch-size", "100", "--buffer-size", "50"], "argument --batch-size"),
    (["--env", "CartPole-v1", "--eps-end", "1.5"], "argument --eps-end"),
    (["--env", "CartPole-v1", "--gamma", "-0.1"], "argument --gamma"),
    (["--env", "CartPole-v1", "--learning-starts", "10"], "argument --learning-starts"),
    (["--env", "ALE/Pong-v5", "--buffer-size", "10000000"], "needs 70.7 GB"),
    (["--env", "CartPole-v1", "--eval-only"], "argument --load"),
])
def test_bad_input_is_one_line(argv, message):
    code, out, err = run_cli(*argv, "--run-dir", "/tmp/dqn-test-never-written")
    assert code == 2 and message in err, err
    assert err.startswith("dqn.py: error:") or "usage:" in err
    assert "Traceback" not in err


def test_load_errors_are_one_line(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a checkpoint")
    missing = tmp_path / "missing.safetensors"
    q, target, opt, _ = make_learner(True)
    dqn.save_checkpoint(tmp_path, q, target, opt, {"env": "CartPole-v1", "arch": "mlp", "num_actions": 2})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tmp_path / "checkpoint.safetensors").read_bytes()[:3000])
    wrong = tmp_path / "model.safetensors"  # a 3-input network: CartPole has 4 inputs
    for path, message in [(junk, "not a readable safetensors file"), (missing, "no such file"),
                          (truncated, "not a readable safetensors file"), (wrong, "does not match the network")]:
        code, _, err = run_cli("--env", "CartPole-v1", "--eval-only", "--load", str(path))
        assert code == 2 and message in err and str(path) in err and "Traceback" not in err


def test_unwritable_run_dir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli("--env", "CartPole-v1", "--run-dir", str(blocker / "run"))
    assert code == 1 and err.startswith("dqn.py: error: run dir") and "Traceback" not in err


def test_image_env_that_is_not_atari_is_refused():
    import gymnasium as gym

    gym.register("ImageTask-v0", entry_point="test_dqn:ImageTask")
    with pytest.raises(dqn.UserError, match="supported are Atari games and tasks with a flat vector"):
        dqn.Env("ImageTask-v0", 1, train=True)


class ImageTask:  # a minimal non-Atari env with image observations, for the test above
    def __new__(cls, **kwargs):
        import gymnasium as gym

        class _Env(gym.Env):
            observation_space = gym.spaces.Box(0, 255, (32, 32, 3), np.uint8)
            action_space = gym.spaces.Discrete(2)

        return _Env()


def test_missing_optional_package_is_one_line():
    with pytest.raises(dqn.UserError, match="needs the package no_such_pkg_xyz: pip install no_such_pkg_xyz"):
        dqn.require("no_such_pkg_xyz")
    assert dqn.video_packages("ALE/Breakout-v5") == ("moviepy", "cv2")
