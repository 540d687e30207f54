"""Deep Q-Networks in MLX, in one file you can read top to bottom.

Implements "Playing Atari with Deep Reinforcement Learning" (Mnih et al., 2013, the NIPS workshop paper),
with the separate target network and the clipped (Huber) error of "Human-level control through deep
reinforcement learning" (Mnih et al., 2015, Nature), which every DQN since has used.

    python dqn.py --env ALE/Pacman-v5            # train on Atari with the paper's settings
    python dqn.py --env CartPole-v1              # learns in about a minute on 2 CPU cores
    python dqn.py --env ALE/Breakout-v5 --total-steps 2000 --learning-starts 500 --buffer-size 10000   # smoke
    python dqn.py --env ALE/Pacman-v5 --eval-only --load runs/<run>/checkpoint.safetensors
    python dqn.py --plot-run runs/<run>          # draws curves.png (needs matplotlib)

Units: an "agent step" is one action of the agent. On Atari it lasts 4 emulator frames (frame skip 4), so
the paper's "10 million frames" are 2.5 million agent steps. Every step count below is in agent steps.

Differences from the paper (paper value -> ours -> why):
- Target network and Huber loss: none in 2013 -> both, 10,000-step sync (2015) -> they made DQN stable;
  `--target-update 0` gives back the 2013 algorithm.
- Optimizer: RMSProp (2013), centered RMSProp lr 2.5e-4 (2015) -> Adam, lr 1e-4 (CleanRL's DQN) and eps
  1.5e-4 (the Rainbow paper's) -> MLX has no centered RMSProp, and Adam is the usual choice for DQN since.
- Replay start, discount, train frequency: not given in 2013 -> 50,000 / 0.99 / every 4 steps (2015 table).
- Epsilon decay "over the first million frames" -> over 1,000,000 agent steps, as DeepMind's released code
  counts them.
- Reward clipping: the learner sees rewards clipped to [-1, 1] as in the paper; the logs show the real score.
- Life loss: a lost life ends the episode for the learner during training only (2015), never in evaluation.
- Evaluation (2015 protocol): epsilon 0.05, up to 30 no-op starts, at most 18,000 frames (5 minutes).
- Sticky actions: none in the papers -> what the id registers (`-v5`: 0.25, `NoFrameskip-v4`: 0), so
  `ALE/Pacman-v5` means what gymnasium says it means.
- Frames: gray 110x84 cropped to 84x84 (2013) -> resized straight to 84x84, max over the last 2 frames of
  each skip (2015).
- Convolutions: each strided convolution is computed as space-to-depth and one matrix product (StridedConv):
  the same function on the same (out, kh, kw, in) weights, with a gradient several times faster on MLX's CPU.
- Classic-control ids (CartPole-v1, ...) use an MLP and their own defaults (see CLASSIC_DEFAULTS).
"""

import argparse
import csv
import ctypes
import ctypes.util
import difflib
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np


# The Linux mlx[cpu] wheel calls the reference BLAS (4 GFLOP/s here). libmlx looks `cblas_sgemm` up when it
# loads, so a faster BLAS loaded into the global namespace *before* `import mlx` serves every matmul (15x).
def load_fast_blas():
    if "mlx.core" in sys.modules:  # too late: MLX already bound its BLAS
        return None
    if sys.platform != "linux":
        return "Accelerate" if sys.platform == "darwin" else "MLX default"
    for name in ("libopenblas.so.0", ctypes.util.find_library("openblas")):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return "OpenBLAS"
        except (OSError, TypeError):
            pass
    return None


BLAS = load_fast_blas()

import gymnasium as gym  # noqa: E402
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402


class UserError(Exception):
    """Bad input or an environment fault: main() prints it as one line and exits with `code`."""

    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------- flags
# Every hyperparameter is a flag. Flags left unset take the paper's value on Atari and the CLASSIC_DEFAULTS
# on small vector-observation tasks, where the Atari values would take hours to learn what needs a minute.
ATARI_DEFAULTS = dict(total_steps=2_500_000, buffer_size=1_000_000, batch_size=32, lr=1e-4, gamma=0.99,
                      eps_start=1.0, eps_end=0.1, eps_decay_steps=1_000_000, learning_starts=50_000,
                      train_freq=4, target_update=10_000, eval_every=250_000, eval_episodes=10,
                      save_every=250_000)
CLASSIC_DEFAULTS = dict(total_steps=50_000, buffer_size=50_000, batch_size=128, lr=2.5e-4, gamma=0.99,
                        eps_start=1.0, eps_end=0.05, eps_decay_steps=10_000, learning_starts=1_000,
                        train_freq=1, target_update=200, eval_every=5_000, eval_episodes=10,
                        save_every=25_000)


def build_parser():
    def default(name):  # the help says both defaults, read from the tables above so they cannot drift
        return f"default: Atari {ATARI_DEFAULTS[name]:,}, classic {CLASSIC_DEFAULTS[name]:,}"

    p = argparse.ArgumentParser(prog="dqn.py", description="DQN (Mnih et al. 2013/2015) in MLX.")
    a = p.add_argument
    a("--env", default="ALE/Pacman-v5", help="gymnasium id: any Atari id, or a task with a flat Box "
      "observation and Discrete actions (CartPole-v1, Acrobot-v1, LunarLander-v3)")
    a("--seed", type=int, default=1, help="seeds the network, replay sampling, exploration and environments")
    a("--total-steps", type=int, help="agent steps to train, in all; one Atari agent step = 4 emulator frames "
      f"(paper: 10M frames = 2.5M steps; {default('total_steps')})")
    a("--arch", choices=("nips", "nature"), default="nips", help="Atari network: nips = 2013 (16/32 conv, "
      "fc 256), nature = 2015 (32/64/64 conv, fc 512)")
    a("--buffer-size", type=int, help=f"replay memory, in transitions (paper: 1M; {default('buffer_size')})")
    a("--batch-size", type=int, help=f"minibatch size (paper: 32; {default('batch_size')})")
    a("--lr", type=float, help=f"Adam learning rate (2015 paper: RMSProp 2.5e-4; {default('lr')})")
    a("--gamma", type=float, help=f"discount factor (2015 paper: 0.99; {default('gamma')})")
    a("--eps-start", type=float, help=f"initial exploration epsilon (paper: 1.0; {default('eps_start')})")
    a("--eps-end", type=float, help=f"final exploration epsilon (paper: 0.1; {default('eps_end')})")
    a("--eps-decay-steps", type=int, help="agent steps over which epsilon falls linearly (paper: 1M; "
      f"{default('eps_decay_steps')})")
    a("--learning-starts", type=int, help="agent steps of random play before learning (2015: 50k; "
      f"{default('learning_starts')})")
    a("--train-freq", type=int, help=f"agent steps between gradient updates (2015: 4; {default('train_freq')})")
    a("--target-update", type=int, help="agent steps between target network syncs; 0 = no target "
      f"network, as in 2013 (2015: 10k; {default('target_update')})")
    a("--double", action="store_true", help="Double DQN target (van Hasselt et al. 2016)")
    a("--num-envs", type=int, default=1, help="parallel environments; each agent step of each counts")
    a("--run-dir", help="where logs and checkpoints go (default runs/<env>-<seed>-<time>)")
    a("--eval-every", type=int, help=f"agent steps between evaluations, 0 = off ({default('eval_every')})")
    a("--eval-episodes", type=int, help=f"episodes per evaluation (2015 paper: 30; {default('eval_episodes')})")
    a("--eval-only", action="store_true", help="evaluate the model given by --load, do not train")
    a("--save-every", type=int, help="agent steps between checkpoints, 0 = only at the end and on Ctrl-C "
      f"({default('save_every')})")
    a("--load", help="a checkpoint.safetensors to resume from, or a model.safetensors to start from")
    a("--plot", action="store_true", help="draw curves.png in the run dir at each evaluation and at the end "
      "(needs matplotlib)")
    a("--plot-run", metavar="RUN_DIR", help="only draw RUN_DIR/curves.png from its CSV files, then exit")
    a("--benchmark", action="store_true", help="print update, environment and end-to-end speed for --env")
    a("--video", action="store_true", help="record a final evaluation episode to the run dir (needs moviepy, "
      "and opencv-python-headless on Atari or pygame on classic tasks)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot_run:
        return args
    defaults = ATARI_DEFAULTS if is_atari(args.env) else CLASSIC_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    checks = [
        ("--total-steps", args.total_steps >= 0 if args.eval_only else args.total_steps > 0, "must be > 0"),
        ("--buffer-size", args.buffer_size > 0, "must be > 0"),
        ("--batch-size", 0 < args.batch_size <= args.buffer_size, "must be > 0 and at most --buffer-size"),
        ("--lr", args.lr > 0, "must be > 0"),
        ("--gamma", 0 <= args.gamma <= 1, "must be in [0, 1]"),
        ("--eps-start", 0 <= args.eps_start <= 1, "must be in [0, 1]"),
        ("--eps-end", 0 <= args.eps_end <= 1, "must be in [0, 1]"),
        ("--eps-decay-steps", args.eps_decay_steps > 0, "must be > 0"),
        ("--learning-starts", args.learning_starts >= args.batch_size, "must be at least --batch-size"),
        ("--train-freq", args.train_freq > 0, "must be > 0"),
        ("--target-update", args.target_update >= 0, "must be >= 0"),
        ("--num-envs", 0 < args.num_envs <= args.buffer_size, "must be > 0 and at most --buffer-size"),
        ("--eval-every", args.eval_every >= 0, "must be >= 0"),
        ("--eval-episodes", args.eval_episodes > 0, "must be > 0"),
        ("--save-every", args.save_every >= 0, "must be >= 0"),
        ("--load", args.load or not args.eval_only, "is required with --eval-only"),
    ]
    for flag, ok, why in checks:
        if not ok:
            parser.error(f"argument {flag}: {why}")
    return args


# ----------------------------------------------------------------------------------------- environments
def env_spec(env_id):
    """gymnasium's registration of `env_id`, or a one-line error that suggests the closest known id."""
    import ale_py

    gym.register_envs(ale_py)
    try:
        return gym.spec(env_id)
    except gym.error.Error:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UserError(f"unknown environment id {env_id!r}{hint}") from None


def is_atari(env_id):
    return "ale_py" in str(env_spec(env_id).entry_point)


class Env:
    """N copies of a game behind one interface, stepped together.

    step() returns the *real* reward, `terminated` (stops bootstrapping: during Atari training also a lost
    life), `truncated` (a time limit: still bootstraps) and `done` (the game is over; with gymnasium's
    next-step autoreset, the next step ignores its action and returns the first observation of a new game).
    """

    def __init__(self, env_id, num_envs, train):
        spec = env_spec(env_id)
        self.atari = "ale_py" in str(spec.entry_point)
        if self.atari:
            self.vec = make_atari(spec, num_envs, train)
        else:
            try:
                self.vec = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync")
            except Exception as e:  # a missing optional dependency (box2d, mujoco, ...) lands here
                raise UserError(f"cannot create {env_id}: {str(e).splitlines()[0]}") from None
        obs, act = self.vec.single_observation_space, self.vec.single_action_space
        if not isinstance(act, gym.spaces.Discrete):
            raise UserError(f"{env_id} has a {type(act).__name__} action space; DQN needs discrete actions")
        if not self.atari and not (isinstance(obs, gym.spaces.Box) and len(obs.shape) == 1):
            raise UserError(f"{env_id} has observations of shape {obs.shape}; supported are Atari games "
                            "and tasks with a flat vector observation")
        self.num_envs, self.num_actions = num_envs, int(act.n)
        self.obs_shape, self.obs_dtype = obs.shape, obs.dtype  # Atari: (4, 84, 84) uint8
        # The replay stores one frame per step: Atari's newest (84, 84) frame of the stack, or the whole vector.
        self.stack = obs.shape[0] if self.atari else 1
        self.frame_shape = obs.shape[1:] if self.atari else obs.shape

    def newest_frame(self, obs):
        return obs[:, -1] if self.atari else obs  # (N, 84, 84) or (N, obs_dim)

    def reset(self, seed):
        return self.vec.reset(seed=seed)[0]

    def send(self, actions):
        """Starts the step; Atari emulators run in ale-py's threads until recv(), while we learn."""
        if self.atari:
            self.vec.send(actions)
        else:
            self.pending = actions

    def recv(self):
        if self.atari:
            obs, reward, terminated, truncated, info = self.vec.recv()
        else:
            obs, reward, terminated, truncated, info = self.vec.step(self.pending)
        game_over = terminated & (info["lives"] == 0) if self.atari else terminated
        return obs, reward.astype(np.float32), terminated, truncated, game_over | truncated

    def step(self, actions):
        self.send(actions)
        return self.recv()

    def close(self):
        self.vec.close()


def make_atari(spec, num_envs, train):
    """ale-py's native, threaded preprocessing, set as gymnasium registers the id (sticky actions, action set).

    Mnih et al. 2013, sec. 4.1: "The raw frames are preprocessed by first converting their RGB representation
    to gray-scale and down-sampling it to a 110x84 image [...] cropping an 84x84 region"; ALE resizes straight
    to 84x84 as the 2015 code did, and stacks "the last 4 frames of a history" into phi.
    """
    from ale_py.vector_env import AtariVectorEnv

    kw = spec.kwargs
    skip = kw.get("frameskip", 4)
    return AtariVectorEnv(
        kw["game"], num_envs,
        # NoFrameskip ids (frameskip=1) expect the agent's wrapper to skip; v0/v4 ids sample a random skip.
        frameskip=skip if isinstance(skip, int) and skip > 1 else 4,
        repeat_action_probability=kw.get("repeat_action_probability", 0.0),
        full_action_space=kw.get("full_action_space", False),
        # Nature 2015 evaluation: "each episode [...] for up to 5 min" = 18,000 frames at 60 Hz.
        max_num_frames_per_episode=kw.get("max_num_frames_per_episode", 108_000) if train else 18_000,
        noop_max=30,
        # Not episodic_life=True: it resets the whole game at each lost life, so the agent would never see
        # its second life. life_loss_info reports `terminated` at each lost life while the game goes on.
        episodic_life=False, life_loss_info=train,
        # We clip rewards ourselves so that the logged score is the real one.
        reward_clipping=False,
    )


# ------------------------------------------------------------------------------------------- Q-network
class StridedConv(nn.Module):
    """A stride-s convolution rewritten as one matrix product and a few shifted sums.

    Cut the image into s x s blocks: an 8x8/4 convolution over 84x84 becomes a 2x2/1 convolution over 21x21
    blocks of 4*4*4 = 64 values (space-to-depth). A 2x2 convolution is, in turn, the product of every block
    with each of the 4 kernel quarters, summed over the 4 shifted positions. The same function with the same
    (out, kh, kw, in) weights as nn.Conv2d, but its gradient is much faster on MLX's CPU backend (README).
    """

    def __init__(self, in_ch, out_ch, kernel, stride):
        super().__init__()
        scale = (in_ch * kernel * kernel) ** -0.5  # nn.Conv2d's uniform init
        self.weight = mx.random.uniform(-scale, scale, (out_ch, kernel, kernel, in_ch))
        self.bias = mx.random.uniform(-scale, scale, (out_ch,))
        self.stride = stride

    def __call__(self, x):
        s, (o, k, _, c) = self.stride, self.weight.shape
        b, h, w, _ = x.shape
        n, oh, ow = k // s, (h - k) // s + 1, (w - k) // s + 1  # n x n kernel quarters; output size
        # (B, H, W, C) -> (B, H/s, W/s, s*s*C): each block's pixels become channels, ordered (dy, dx, c).
        x = x.reshape(b, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // s, w // s, -1)
        # (O, k, k, C) -> (s*s*C, n*n*O): column block (i, j) is kernel quarter (i, j) in x's channel order.
        wt = self.weight.reshape(o, n, s, n, s, c).transpose(2, 4, 5, 1, 3, 0).reshape(s * s * c, n * n * o)
        z = (x @ wt).reshape(b, h // s, w // s, n * n, o)  # every block times every quarter
        y = self.bias
        for i in range(n):  # output (p, q) sums quarter (i, j) applied to block (p + i, q + j)
            for j in range(n):
                y = y + z[:, i:i + oh, j:j + ow, i * n + j]
        return y  # (B, oh, ow, O)


class AtariQNetwork(nn.Module):
    """Mnih et al. 2013, sec. 4.1: "The first hidden layer convolves 16 8x8 filters with stride 4 [...] The
    second hidden layer convolves 32 4x4 filters with stride 2 [...] The final hidden layer is fully-connected
    and comprises 256 rectifier units. The output layer is a fully-connected linear layer with a single output
    for each valid action." The 2015 network: 32 8x8/4, 64 4x4/2, 64 3x3/1, fc 512."""

    ARCHS = {"nips": ([(16, 8, 4), (32, 4, 2)], 9 * 9 * 32, 256),  # 2592 = 9*9*32
             "nature": ([(32, 8, 4), (64, 4, 2), (64, 3, 1)], 7 * 7 * 64, 512)}  # 3136 = 7*7*64

    def __init__(self, num_actions, arch="nips"):
        super().__init__()
        convs, flat, hidden = self.ARCHS[arch]
        chans = [4] + [c for c, _, _ in convs]
        self.convs = [StridedConv(i, o, k, s) if s > 1 else nn.Conv2d(i, o, k)
                      for i, (o, k, s) in zip(chans[:-1], convs, strict=True)]
        self.fc = nn.Linear(flat, hidden)
        self.out = nn.Linear(hidden, num_actions)

    def __call__(self, x):
        # Legend: B batch, 4 stacked frames. Pixels arrive as uint8 and become floats only here.
        # MLX convolutions are channels-last: (B, 4, 84, 84) -> (B, 84, 84, 4).
        x = x.transpose(0, 2, 3, 1).astype(mx.float32) / 255.0
        for conv in self.convs:  # nips: -> (B, 20, 20, 16) -> (B, 9, 9, 32); nature adds -> (B, 7, 7, 64)
            x = nn.relu(conv(x))
        x = nn.relu(self.fc(x.reshape(x.shape[0], -1)))  # (B, 2592 or 3136) -> (B, 256 or 512)
        return self.out(x)  # (B, num_actions)


class MLPQNetwork(nn.Module):
    """For vector observations (CartPole and friends): two hidden layers of 128 rectifier units."""

    def __init__(self, obs_dim, num_actions):
        super().__init__()
        self.layers = [nn.Linear(obs_dim, 128), nn.Linear(128, 128), nn.Linear(128, num_actions)]

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1).astype(mx.float32)  # (B, 1, obs_dim) -> (B, obs_dim)
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)  # (B, num_actions)


def make_q_network(env, arch):
    return AtariQNetwork(env.num_actions, arch) if env.atari else MLPQNetwork(env.obs_shape[0], env.num_actions)


# ------------------------------------------------------------------------------------------ replay memory
class Replay:
    """Mnih et al. 2013, sec. 4: "we store the agent's experiences at each time-step, e_t = (s_t, a_t, r_t,
    s_t+1) in a data-set D [...] In practice, our algorithm only stores the last N experience tuples."

    Each frame is stored once: a stack phi(s_t) is rebuilt at sample time from the frames t-3..t, and s_t+1
    from t-2..t+1, so 1M Atari transitions take 7.1 GB instead of 56 GB. All envs step together, so slot t
    holds the frame of every env at agent step t: frames has shape (slots, num_envs, *frame_shape). Slot t also
    holds the action taken from it and what followed; `first` marks the first frame of an episode, before
    which a stack shows zeros, as the environment did when the agent acted.
    """

    def __init__(self, capacity, num_envs, frame_shape, dtype, stack):
        self.slots, self.num_envs, self.stack = capacity // num_envs, num_envs, stack
        shape = (self.slots, num_envs)
        self.frames = np.zeros(shape + tuple(frame_shape), dtype)
        self.action = np.zeros(shape, np.int32)
        self.reward = np.zeros(shape, np.float32)  # already clipped
        self.terminated = np.zeros(shape, bool)
        self.first = np.zeros(shape, bool)
        self.valid = np.zeros(shape, bool)  # a complete transition starts at this slot
        self.pos, self.full = 0, False

    @staticmethod
    def nbytes(capacity, frame_shape, dtype):
        return capacity * (int(np.prod(frame_shape)) * np.dtype(dtype).itemsize + 4 + 4 + 3)

    def _write(self, frame, first):
        self.frames[self.pos], self.first[self.pos], self.valid[self.pos] = frame, first, False
        self.pos = (self.pos + 1) % self.slots
        self.full = self.full or self.pos == 0

    def start(self, frame):
        """The first frame of every env after reset(): (N, *frame_shape)."""
        self._write(frame, True)

    def add(self, action, reward, terminated, next_frame, is_reset):
        """Completes the transitions from the last frame and stores the next one. Where `is_reset`, that last
        frame ended a game and next_frame starts a new one: no transition joins them."""
        t = (self.pos - 1) % self.slots
        self.action[t], self.reward[t], self.terminated[t] = action, reward, terminated
        self._write(next_frame, is_reset)
        self.valid[t] = ~is_reset

    def __len__(self):
        return self.slots * self.num_envs if self.full else self.pos * self.num_envs

    def sample(self, batch_size, rng):
        """Returns x (B, stack+1, *frame_shape) holding s = x[:, :-1] and s' = x[:, 1:], and a, r, terminated."""
        t, e = np.empty(0, np.int64), np.empty(0, np.int64)
        filled = self.slots if self.full else self.pos
        while len(t) < batch_size:
            tt, ee = rng.integers(filled, size=2 * batch_size), rng.integers(self.num_envs, size=2 * batch_size)
            # When full, the oldest stack-1 slots have lost their history to the newest frames.
            ok = self.valid[tt, ee] & ((tt - self.pos) % self.slots >= self.stack - 1 if self.full else True)
            t, e = np.concatenate([t, tt[ok]]), np.concatenate([e, ee[ok]])
        t, e = t[:batch_size], e[:batch_size]
        idx = (t[:, None] + np.arange(1 - self.stack, 2)) % self.slots  # (B, stack+1): slots t-3 .. t+1
        x = self.frames[idx, e[:, None]]  # (B, stack+1, *frame_shape)
        # Frame t-3+k is hidden if an episode starts in a later slot up to t: (B, stack-1).
        starts = self.first[idx[:, 1:self.stack], e[:, None]]
        hidden = np.logical_or.accumulate(starts[:, ::-1], axis=1)[:, ::-1]
        x[:, :self.stack - 1][hidden] = 0
        return x, self.action[t, e], self.reward[t, e], self.terminated[t, e]


# ---------------------------------------------------------------------------------------- exploration
def epsilon(step, start, end, decay_steps):
    """Mnih et al. 2013, sec. 5: "epsilon annealed linearly from 1 to 0.1 over the first million frames, and
    fixed at 0.1 thereafter." A pure function of the step, so a resumed run continues where it stopped."""
    return end + (start - end) * max(0.0, 1.0 - step / decay_steps)


def compiled_q(q):
    """Q as one compiled function for acting (25% faster at batch 1). It reads the weights from `inputs` at
    every call, so it follows each update; without them it would act forever with the weights it first saw."""
    return mx.compile(lambda x: q(x), inputs=q.state)


def act(q, obs, eps, rng, num_actions):
    """Epsilon-greedy for N envs. The coins are drawn first: the network runs only if some env exploits."""
    explore = rng.random(len(obs)) < eps
    actions = rng.integers(num_actions, size=len(obs))
    if not explore.all():
        greedy = np.array(mx.argmax(q(mx.array(obs)), axis=1))  # sync point: one per agent step
        actions = np.where(explore, actions, greedy)
    return actions


# ---------------------------------------------------------------------------------------- learning step
def td_target(q_next_target, q_next_online, reward, terminated, gamma, double):
    """y = r + gamma * max_a' Q(s', a'; theta^-), and y = r where s' is terminal (2013, Algorithm 1).
    Double DQN lets the online net choose a' and the target net value it (van Hasselt et al. 2016)."""
    if double:  # forker: variants of the target go here
        best = mx.argmax(q_next_online, axis=1, keepdims=True)
        next_value = mx.take_along_axis(q_next_target, best, axis=1)[:, 0]
    else:
        next_value = q_next_target.max(axis=1)
    return reward + gamma * (1.0 - terminated) * next_value


def make_train_step(q, target, opt, gamma, double, compile=True):
    """One gradient step on a minibatch. Returns (loss, mean max_a Q(s, a)), both lazy MLX scalars."""

    def loss_fn(s, a, y):
        q_values = q(s)  # (B, num_actions)
        q_sa = mx.take_along_axis(q_values, a[:, None], axis=1)[:, 0]  # (B,)
        # Mnih et al. 2015: "clip the error term from the update [...] to be between -1 and 1", i.e. Huber.
        return nn.losses.huber_loss(q_sa, y, delta=1.0, reduction="mean"), q_values.max(axis=1).mean()

    loss_and_grad = nn.value_and_grad(q, loss_fn)

    def step(x, a, r, terminated):
        s, s_next = x[:, :-1], x[:, 1:]  # (B, stack, ...) each; they share stack-1 frames
        q_next_online = q(s_next) if double else None
        y = mx.stop_gradient(td_target(target(s_next), q_next_online, r, terminated, gamma, double))
        (loss, max_q), grads = loss_and_grad(s, a, y)
        opt.update(q, grads)
        return loss, max_q

    if not compile:
        return step
    # Everything the step reads that changes between calls is captured: online net, target net, optimizer.
    state = [q.state, target.state, opt.state]
    return mx.compile(step, inputs=state, outputs=state)


def sync_target(q, target):
    """Mnih et al. 2015: "every C updates we clone the network Q to obtain a target network Q^"." MLX arrays
    are immutable, so sharing them is a copy: the optimizer replaces q's arrays, never edits them."""
    if target is not q:
        target.update(q.parameters())


# ---------------------------------------------------------------------------------------- checkpoints
def atomic_save(path, arrays, metadata):
    """Temporary file, fsync, rename: a crash or a full disk mid-write leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except (OSError, RuntimeError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e}", code=1) from None


def save_checkpoint(run_dir, q, target, opt, meta):
    """checkpoint.safetensors resumes a run (both nets, optimizer, counters, RNG state); model.safetensors
    holds the Q weights alone, loadable by any MLX user with `model.load_weights`."""
    md = {"dqn": json.dumps(meta)}
    weights = dict(tree_flatten(q.parameters()))
    arrays = {"q." + k: v for k, v in weights.items()}
    arrays.update({"target." + k: v for k, v in tree_flatten(target.parameters())})
    arrays.update({"opt." + k: v for k, v in tree_flatten(opt.state)})
    atomic_save(Path(run_dir) / "checkpoint.safetensors", arrays, md)
    atomic_save(Path(run_dir) / "model.safetensors", weights, md)


def load_checkpoint(path, q, target, opt, expect):
    """Loads weights (and, from a full checkpoint, target and optimizer); returns the saved metadata."""
    if not Path(path).is_file():
        raise UserError(f"--load {path}: no such file")
    try:
        arrays, md = mx.load(str(path), return_metadata=True)
        meta = json.loads(md["dqn"]) if "dqn" in md else {}
    except Exception:
        raise UserError(f"--load {path}: not a readable safetensors file (truncated or another format)") from None
    saved = {k: meta.get(k, "?") for k in expect}
    if any(saved[k] != expect[k] for k in expect):
        def describe(d):
            return ", ".join(f"{k}={v}" for k, v in d.items())

        raise UserError(f"--load {path}: saved for {describe(saved)}, but this run has {describe(expect)}")
    full = any(k.startswith("q.") for k in arrays)
    weights = {k[2:]: v for k, v in arrays.items() if k.startswith("q.")} if full else arrays
    try:
        q.load_weights(list(weights.items()))
        if full:
            target.load_weights([(k[7:], v) for k, v in arrays.items() if k.startswith("target.")])
            opt.state = tree_unflatten([(k[4:], v) for k, v in arrays.items() if k.startswith("opt.")])
    except ValueError as e:
        raise UserError(f"--load {path}: does not match the network: {str(e).splitlines()[0]}") from None
    if not full:
        sync_target(q, target)
    return dict(meta, full=full)  # full: a checkpoint to resume, not only weights to start from


# -------------------------------------------------------------------------------------------- evaluation
def evaluate(q, env_id, episodes, seed, eps=0.05):
    """Mnih et al. 2015: "The trained agents were evaluated by playing each game 30 times for up to 5 min
    each time with different initial random conditions ('no-op') and an epsilon-greedy policy with epsilon =
    0.05." One env per episode, in a separate instance: the training game in flight is never touched, and
    short episodes are not over-counted. Returns the real (unclipped) score of each episode."""
    env, rng = Env(env_id, episodes, train=False), np.random.default_rng(seed)
    obs = env.reset(seed=seed)
    returns, running = np.full(episodes, np.nan), np.zeros(episodes)
    while np.isnan(returns).any():
        obs, reward, _, _, done = env.step(act(q, obs, eps, rng, env.num_actions))
        running += reward
        finished = done & np.isnan(returns)
        returns[finished] = running[finished]
    env.close()
    return returns


def held_out_states(env_id, count, seed):
    """Mnih et al. 2013, sec. 5.1: "we collect a fixed set of states by running a random policy before
    training starts and track the average of the maximum predicted Q for these states.\""""
    env, rng = Env(env_id, 1, train=False), np.random.default_rng(seed)
    states = [env.reset(seed=seed)]
    for _ in range(count - 1):
        states.append(env.step(rng.integers(env.num_actions, size=1))[0])
    env.close()
    return np.concatenate(states)  # (count, *obs_shape)


def average_max_q(q, states):
    return float(q(mx.array(states)).max(axis=1).mean())  # sync point


def require(*packages):
    """Imports optional packages lazily; a missing one is a one-line error naming what to install."""
    pip_names = {"cv2": "opencv-python-headless", "pygame": "pygame"}
    for name in packages:
        try:
            __import__(name)
        except ImportError:
            raise UserError(f"this option needs the package {name}: pip install {pip_names.get(name, name)}") from None


def video_packages(env_id):
    # RecordVideo writes with moviepy; AtariPreprocessing resizes with OpenCV; classic tasks draw with pygame.
    return ("moviepy", "cv2") if is_atari(env_id) else ("moviepy", "pygame")


def record_video(q, env_id, run_dir, seed, episodes=1, eps=0.05):
    """Records evaluation episodes as the real game screen, with gymnasium's RecordVideo. ale-py's vector env
    shows only the 84x84 input, so this runs one Python env with gymnasium's own Atari preprocessing."""
    require(*video_packages(env_id))
    atari = is_atari(env_id)
    env = gym.make(env_id, render_mode="rgb_array", **({"frameskip": 1} if atari else {}))
    if atari:
        env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, terminal_on_life_loss=False)
        env = gym.wrappers.FrameStackObservation(env, 4, padding_type="zero")  # zeros, as the vector env
    env = gym.wrappers.RecordVideo(env, str(Path(run_dir) / "videos"), episode_trigger=lambda _: True,
                                   disable_logger=True)
    rng = np.random.default_rng(seed)
    for i in range(episodes):
        obs, done = env.reset(seed=seed + i)[0], False
        while not done:
            action = act(q, np.asarray(obs)[None], eps, rng, env.action_space.n)[0]
            obs, _, terminated, truncated, _ = env.step(int(action))
            done = terminated or truncated
    env.close()


def plot_run(run_dir):
    """Training return, evaluation return and average max Q against agent steps, like the 2013 Figure 2."""
    require("matplotlib")
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.csv").exists():
        raise UserError(f"{run_dir} holds no metrics.csv: is it a run directory?")

    def read(name):
        path = run_dir / name
        rows = list(csv.DictReader(open(path))) if path.exists() else []
        return lambda col: np.array([float(r[col]) for r in rows if r.get(col) not in (None, "")])

    train, ev = read("metrics.csv"), read("eval.csv")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(train("step"), train("episodic_return"), ".", alpha=0.3, label="episode")
    axes[1].errorbar(ev("step"), ev("mean_return"), yerr=ev("std_return"), marker="o", capsize=3)
    axes[2].plot(ev("step"), ev("avg_max_q"), marker="o")
    titles = ("Training return (real score)", "Evaluation return (epsilon 0.05)", "Average max Q, held-out states")
    for ax, title in zip(axes, titles, strict=True):
        ax.set(title=title, xlabel="agent steps")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    plt.close(fig)
    return run_dir / "curves.png"


# ---------------------------------------------------------------------------------------- training loop
class CsvLog:
    """Appends rows to a CSV file and flushes each one, so a crash loses nothing already logged."""

    def __init__(self, path, columns):
        new = not path.exists()
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, columns)
        if new:
            self.writer.writeheader()

    def write(self, **row):
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self.file.flush()


class Progress:
    """Real game scores per finished episode (metrics.csv) and a progress line every few seconds."""

    def __init__(self, run_dir, step, episodes, num_envs, log):
        self.csv = CsvLog(run_dir / "metrics.csv", ["step", "episode", "episodic_return", "episode_length",
                                                     "epsilon", "loss", "avg_max_q"])
        self.step, self.episodes, self.log = step, episodes, log
        self.score, self.length = np.zeros(num_envs), np.zeros(num_envs, np.int64)
        self.returns, self.losses, self.qs, self.loss, self.q = [], [], [], float("nan"), float("nan")
        self.first_losses = []  # the first 1,000, returned to the caller (tests compare seeds with them)
        self.t_line, self.step_line = time.time(), step

    def agent_step(self, reward, done, live, eps):
        """live: False for envs whose step only returned a reset observation."""
        self.score += reward * live
        self.length += live
        self.step += int(live.sum())
        for i in np.flatnonzero(done & live):
            self.episodes += 1
            self.returns = (self.returns + [float(self.score[i])])[-20:]
            self.csv.write(step=self.step, episode=self.episodes, episodic_return=float(self.score[i]),
                           episode_length=int(self.length[i]), epsilon=eps, loss=self.loss, avg_max_q=self.q)
            self.score[i], self.length[i] = 0, 0
        if time.time() - self.t_line > 5:
            self.line(eps)

    def update(self, loss, q):
        self.loss, self.q = loss, q
        self.losses.append(loss)
        self.qs.append(q)
        if len(self.first_losses) < 1000:
            self.first_losses.append(loss)

    def line(self, eps):
        sps = (self.step - self.step_line) / (time.time() - self.t_line)
        ret = f"{np.mean(self.returns):.1f}" if self.returns else "-"
        loss = f"{np.mean(self.losses):.4f} | q {np.mean(self.qs):.3f}" if self.losses else "- | q -"
        self.log(f"step {self.step:,} | {sps:.0f} sps | episodes {self.episodes} | return {ret} | eps {eps:.3f} "
                 f"| loss {loss}")
        self.t_line, self.step_line, self.losses, self.qs = time.time(), self.step, [], []


def memory_available():
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_rss():
    """Peak resident memory of this process, in bytes."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux counts kilobytes


def make_replay(env, args):
    """The replay for this env, refused before any allocation when it cannot fit in memory."""
    need, have = Replay.nbytes(args.buffer_size, env.frame_shape, env.obs_dtype), memory_available()
    if need > have:
        raise UserError(f"a replay of {args.buffer_size:,} transitions needs {need / 1e9:.1f} GB but "
                        f"{have / 1e9:.1f} GB is available; lower --buffer-size")
    if args.buffer_size // args.num_envs < env.stack + 2:
        raise UserError(f"--buffer-size {args.buffer_size} leaves fewer than {env.stack + 2} slots per env")
    return Replay(args.buffer_size, args.num_envs, env.frame_shape, env.obs_dtype, env.stack)


def make_run_dir(args):
    run_dir = Path(args.run_dir or f"runs/{args.env.replace('/', '_')}-{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(vars(args), indent=2))
    except OSError as e:
        raise UserError(f"run dir {run_dir} is not writable: {e.strerror}", code=1) from None
    return run_dir


def train(args, log=print):
    """Mnih et al. 2013, Algorithm 1 (deep Q-learning with experience replay), with a target network.
    Writes config.json, metrics.csv, eval.csv and checkpoints into the run dir; returns a summary dict."""
    env = Env(args.env, args.num_envs, train=not args.eval_only)
    require(*(["matplotlib"] if args.plot else []), *(video_packages(args.env) if args.video else []))
    replay = None if args.eval_only else make_replay(env, args)  # checked before anything is written
    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    q = make_q_network(env, args.arch)
    target = q if args.target_update == 0 else make_q_network(env, args.arch)  # theta^-
    sync_target(q, target)
    opt = optim.Adam(learning_rate=args.lr, eps=1.5e-4)
    opt.init(q.trainable_parameters())
    identity = {"env": args.env, "arch": args.arch if env.atari else "mlp", "num_actions": env.num_actions}
    meta = load_checkpoint(args.load, q, target, opt, identity) if args.load else {}
    mx.eval(q.parameters(), target.parameters(), opt.state)
    run_dir = make_run_dir(args)
    size = "" if replay is None else f"replay {args.buffer_size:,} transitions = {replay.frames.nbytes / 1e9:.2f} GB | "
    log(f"env {args.env}: {env.num_actions} actions, obs {env.obs_shape} | BLAS: {BLAS or 'reference'} | {size}"
        f"run dir {run_dir}")
    if BLAS is None:
        log("hint: MLX uses the slow reference BLAS; `apt-get install libopenblas0-pthread` trains ~10x faster")

    held_out = held_out_states(args.env, 500 if env.atari else 100, args.seed + 2)
    eval_log = CsvLog(run_dir / "eval.csv", ["step", "mean_return", "std_return", "episodes", "avg_max_q"])

    def run_eval(step):
        returns = evaluate(q, args.env, args.eval_episodes, args.seed + 1 + step)
        row = dict(step=step, mean_return=float(returns.mean()), std_return=float(returns.std()),
                   episodes=len(returns), avg_max_q=average_max_q(q, held_out))
        eval_log.write(**row)
        log(f"eval at step {step:,}: return {row['mean_return']:.1f} +- {row['std_return']:.1f} over "
            f"{len(returns)} episodes | avg max Q {row['avg_max_q']:.3f}")
        if args.plot:
            plot_run(run_dir)
        return row

    if args.eval_only:
        env.close()
        evals = [run_eval(meta.get("step", 0))]
        if args.video:
            record_video(q, args.env, run_dir, args.seed + 3)
        return {"evals": evals, "run_dir": run_dir}

    step, episodes = (meta.get("step", 0), meta.get("episodes", 0)) if meta.get("full") else (0, 0)
    if meta.get("full"):  # resuming: counters and random stream go on; the replay refills first
        rng.bit_generator.state = meta["rng"]
        eps = epsilon(step, args.eps_start, args.eps_end, args.eps_decay_steps)
        log(f"resumed at step {step:,}, epsilon {eps:.3f}; learning resumes after {args.learning_starts:,} new "
            "steps refill the replay")
    train_step, q_act = make_train_step(q, target, opt, args.gamma, args.double), compiled_q(q)
    progress = Progress(run_dir, step, episodes, args.num_envs, log)

    def checkpoint():
        save_checkpoint(run_dir, q, target, opt, dict(identity, step=progress.step, episodes=progress.episodes,
                                                      rng=rng.bit_generator.state))

    stop = []  # SIGINT/SIGTERM only set this: the loop ends its step, saves and exits
    handlers = {s: signal.signal(s, lambda signum, _: stop.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    obs = env.reset(seed=args.seed + step)  # (N, 4, 84, 84) uint8 or (N, obs_dim)
    replay.start(env.newest_frame(obs))
    was_done = np.zeros(args.num_envs, bool)
    next_update, next_sync = step + args.learning_starts, step + args.target_update
    evals, t_learn, step_learn = [], None, None
    try:
        while step < args.total_steps and not stop:
            eps = epsilon(step, args.eps_start, args.eps_end, args.eps_decay_steps)
            actions = act(q_act, obs, eps, rng, env.num_actions)
            env.send(actions)
            while step >= next_update:  # one update per --train-freq agent steps, while the emulators run
                x, a, r, term = replay.sample(args.batch_size, rng)  # x: (B, 5, 84, 84) uint8; a, r, term: (B,)
                loss, max_q = train_step(mx.array(x), mx.array(a), mx.array(r), mx.array(term, mx.float32))
                mx.eval(loss, max_q, q.state, opt.state)  # sync point: one per update
                progress.update(loss.item(), max_q.item())
                if not (np.isfinite(progress.loss) and np.isfinite(progress.q)):
                    raise UserError(f"the loss became {progress.loss} (Q {progress.q}) at step {step:,}; the last "
                                    f"good checkpoint in {run_dir} is kept; try a lower --lr", code=1)
                next_update += args.train_freq
                t_learn, step_learn = t_learn or time.time(), step_learn or step
            obs, reward, terminated, truncated, done = env.recv()
            # Mnih et al. 2013, sec. 5: "we fixed all positive rewards to be 1 and all negative rewards to be -1,
            # leaving 0 rewards unchanged." The learner sees the clipped reward; the logs keep the real score.
            replay.add(actions, np.clip(reward, -1, 1), terminated, env.newest_frame(obs), was_done)
            progress.agent_step(reward, done, ~was_done, eps)  # after a game over, a step only resets
            was_done = done & ~was_done
            prev, step = step, progress.step
            if args.target_update and step >= next_sync:
                sync_target(q, target)
                next_sync += args.target_update
            if args.eval_every and step // args.eval_every > prev // args.eval_every:
                evals.append(run_eval(step))
            if args.save_every and step // args.save_every > prev // args.save_every:
                checkpoint()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        env.close()
    checkpoint()
    if stop:
        log(f"stopped by signal at step {step:,}; checkpoint saved in {run_dir}")
        raise SystemExit(128 + stop[0])
    log(f"done: {step:,} steps; peak memory {peak_rss() / 1e9:.2f} GB; model in {run_dir / 'model.safetensors'}")
    if args.eval_every and (not evals or evals[-1]["step"] != step):  # a final evaluation, unless one just ran
        evals.append(run_eval(step))
    if args.video:
        record_video(q, args.env, run_dir, args.seed + 3)
    if args.plot:
        plot_run(run_dir)
    learning_sps = (step - step_learn) / (time.time() - t_learn) if t_learn else float("nan")
    return dict(step=step, episodes=progress.episodes, evals=evals, losses=progress.first_losses, run_dir=run_dir,
                learning_sps=learning_sps)


# ------------------------------------------------------------------------------------------- benchmark
def benchmark(args, log=print, reps=3):
    """--benchmark: the README's speed table for --env, each figure the median of `reps` repetitions.
    End to end is steady state: epsilon fixed at --eps-end, learning on, from the first update to the end."""
    import tempfile

    env, rng = Env(args.env, args.num_envs, train=True), np.random.default_rng(args.seed)
    env.reset(seed=args.seed)

    def env_sps(n=3000):
        t = time.perf_counter()
        for _ in range(n // args.num_envs):
            env.step(rng.integers(env.num_actions, size=args.num_envs))
        return n / (time.perf_counter() - t)

    log(f"{args.env}, {args.num_envs} env(s), batch {args.batch_size}, train every {args.train_freq} steps, "
        f"BLAS: {BLAS or 'reference'}")
    log(f"environment alone: {np.median([env_sps() for _ in range(reps)]):.0f} agent steps/s")
    env.close()
    archs = ("nips", "nature") if env.atari else ("mlp",)
    for arch in archs:
        q, target = make_q_network(env, arch), make_q_network(env, arch)
        opt = optim.Adam(learning_rate=args.lr)
        train_step = make_train_step(q, target, opt, args.gamma, args.double)
        x = mx.array(rng.integers(0, 256, (args.batch_size, *env.obs_shape), np.uint8)[:, [0, 0, 1, 2, 3]]
                     if env.atari else rng.normal(size=(args.batch_size, 2, *env.obs_shape)).astype(np.float32))
        a, r = mx.array(rng.integers(env.num_actions, size=args.batch_size)), mx.zeros(args.batch_size)
        speeds = []
        for n in [3] + [20] * reps:  # the first 3 compile
            t = time.perf_counter()
            for _ in range(n):
                mx.eval(train_step(x, a, r, r), q.state, opt.state)
            speeds.append(n / (time.perf_counter() - t))
        log(f"{arch}: update alone: {np.median(speeds[1:]):.1f} updates/s")
        e2e = []
        for _ in range(reps):
            with tempfile.TemporaryDirectory() as tmp:
                run = argparse.Namespace(**dict(vars(args), arch=arch, eps_start=args.eps_end, learning_starts=2000,
                                                total_steps=5000, buffer_size=100_000, eval_every=0, save_every=0,
                                                load=None, run_dir=tmp, plot=False, video=False, eval_only=False))
                e2e.append(train(run, log=lambda *_: None)["learning_sps"])
        log(f"{arch}: end to end: {np.median(e2e):.1f} agent steps/s (runs: {', '.join(f'{v:.1f}' for v in e2e)})")
    log(f"peak memory: {peak_rss() / 1e9:.2f} GB")


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.plot_run:
            print(f"wrote {plot_run(args.plot_run)}")
        elif args.benchmark:
            benchmark(args)
        else:
            train(args)
    except KeyboardInterrupt:  # before the training loop's own handler is installed
        print("dqn.py: error: interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"dqn.py: error: {e}", file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
