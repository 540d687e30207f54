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

Differences from the papers (paper -> ours -> why):
- Target network and Huber loss: none in 2013 -> both (2015) -> they made DQN stable. The target is synced
  every 10,000 agent steps (2,500 updates): the 2015 table counts its C = 10,000 in updates, but DeepMind's
  released code counts agent steps (numSteps in NeuralQLearner.lua), as Dopamine does. `--target-update 0`
  bootstraps from the online network as in 2013, but keeps the Huber loss and Adam: it is the 2013 target,
  not the whole 2013 update rule (squared error, RMSProp).
- Optimizer: RMSProp (2013), centered RMSProp with lr 2.5e-4 (2015) -> Adam with bias correction (as
  PyTorch's, which CleanRL uses), lr 1e-4 (CleanRL's DQN), eps 1.5e-4 (the Rainbow paper's) -> MLX has no
  centered RMSProp, and Adam is the usual choice for DQN since. Its moments below 1e-30 are set to zero
  (FlushedAdam): the same weights, without the subnormal floats that halved the speed of long runs.
- Replay start, discount, train frequency: not given in 2013 -> 50,000 / 0.99 / every 4 steps (2015 table).
- Epsilon: annealed "over the first million frames" -> over 1,000,000 agent steps that start when learning
  starts, as DeepMind's released code (NeuralQLearner.lua) counts them; the random fill stays at 1.0.
- Reward clipping: on Atari only, where "the scale of scores varies greatly from game to game"; classic
  tasks keep their rewards (LunarLander's +-100 are the task). The logs always show the real score.
- Life loss: a lost life ends the episode for the learner during training only (2015), never in evaluation.
- Evaluation (2015): 30 games of at most 18,000 frames, epsilon 0.05 (`--eval-eps`), up to 30 no-op starts.
- Sticky actions: none in the papers -> what the id registers (`-v5`: 0.25, `NoFrameskip-v4`: 0).
- Frames: gray 110x84 cropped to 84x84 (2013) -> resized straight to 84x84, max over the last 2 frames of
  each skip (2015).
- Convolutions on the CPU (StridedConv): the strided ones computed as space-to-depth and one matrix product,
  all with a hand-written gradient: nn.Conv2d's function and (out, kh, kw, in) weights, with a gradient
  several times faster on MLX's CPU.
- Classic-control ids (CartPole-v1, ...) use an MLP and their own defaults (see HYPERPARAMETERS).
"""

import argparse
import contextlib
import csv
import ctypes
import ctypes.util
import difflib
import glob
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


# The Linux mlx[cpu] wheel calls the reference BLAS (4 GFLOP/s here). libmlx looks `cblas_sgemm` up when it
# loads, so a fast BLAS loaded into the global namespace *before* `import mlx` serves every matmul (15-35x).
def load_blas(candidates):
    """The name of the first candidate (name, path) that loads and exports cblas_sgemm, else None."""
    for name, path in candidates:
        with contextlib.suppress(OSError):  # a None path would open this program itself and prove nothing
            if path and hasattr(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL), "cblas_sgemm"):
                return name
    return None


BLAS = "Accelerate" if sys.platform == "darwin" else None
if BLAS is None and "mlx.core" not in sys.modules:  # loaded after MLX, a BLAS would serve no matmul
    # MKL installed into this environment first (chosen on purpose, the faster here: README), then OpenBLAS.
    BLAS = load_blas([("MKL", p) for p in sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))]
                     + [("OpenBLAS", "libopenblas.so.0"), ("OpenBLAS", ctypes.util.find_library("openblas"))])
BLAS_HINT = "`apt-get install libopenblas0-pthread` or `pip install mkl` makes MLX's CPU matmuls ~30x faster"

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
# Every hyperparameter is a flag. Unset, it takes the paper's value on Atari and the second value on small
# vector-observation tasks (CartPole...), where Atari's would take hours to learn what needs a minute.
HYPERPARAMETERS = {  # flag: (Atari, classic, help)
    "total_steps": (2_500_000, 50_000, "agent steps to train; an Atari step is 4 frames (paper: 10M frames)"),
    "buffer_size": (1_000_000, 50_000, "replay memory N, in transitions (paper: 1M)"),
    "batch_size": (32, 128, "minibatch size (paper: 32)"),
    "lr": (1e-4, 2.5e-4, "Adam learning rate (2015: RMSProp, 2.5e-4)"),
    "gamma": (0.99, 0.99, "discount factor (2015: 0.99)"),
    "eps_start": (1.0, 1.0, "initial exploration epsilon (paper: 1.0)"),
    "eps_end": (0.1, 0.05, "final exploration epsilon (paper: 0.1)"),
    "eps_decay_steps": (1_000_000, 10_000, "steps for epsilon to fall, from --learning-starts (paper: 1M)"),
    "learning_starts": (50_000, 1_000, "steps of random play before learning (2015: 50k)"),
    "train_freq": (4, 1, "agent steps between updates (2015: 4)"),
    "target_update": (10_000, 200, "agent steps between target syncs, 0 = no target network (2015: 10k)"),
    "eval_every": (250_000, 5_000, "agent steps between evaluations, 0 = off"),
    "eval_episodes": (30, 10, "episodes per evaluation (2015: 30)"),
    "save_every": (250_000, 25_000, "agent steps between checkpoints, 0 = only at the end and on Ctrl-C"),
}


def build_parser():
    p = argparse.ArgumentParser(prog="dqn.py", description="DQN (Mnih et al. 2013/2015) in MLX.")
    add = p.add_argument
    add("--env", default="ALE/Pacman-v5", help="gymnasium id: any Atari id, or a task with a flat Box "
        "observation and Discrete actions (CartPole-v1, Acrobot-v1, LunarLander-v3)")
    add("--seed", type=int, default=1, help="seeds the network, replay sampling, exploration and the envs")
    add("--arch", choices=("nips", "nature"), default="nips", help="Atari network: nips = 2013 (16/32 conv, "
        "fc 256), nature = 2015 (32/64/64 conv, fc 512)")
    for name, (atari, classic, text) in HYPERPARAMETERS.items():
        add("--" + name.replace("_", "-"), type=type(atari), help=f"{text}; default Atari {atari:,}, "
            f"classic {classic:,}")
    add("--clip-rewards", action=argparse.BooleanOptionalAction, help="clip the learner's rewards to [-1, 1] "
        "(2013: yes; default: on for Atari, off for classic tasks)")
    add("--double", action="store_true", help="Double DQN target (van Hasselt et al. 2016)")
    add("--num-envs", type=int, default=1, help="parallel environments; each agent step of each counts")
    add("--device", choices=("cpu", "gpu"), help="MLX device (default: MLX's own choice)")
    add("--run-dir", help="where logs and checkpoints go (default runs/<env>-<seed>-<time>, or the "
        "directory of the checkpoint given to --load)")
    add("--eval-eps", type=float, default=0.05, help="evaluation epsilon (2015: 0.05; Dopamine 0.001)")
    add("--eval-only", action="store_true", help="evaluate the model given by --load, do not train")
    add("--load", help="a checkpoint.safetensors to resume from, or a model.safetensors to start from")
    add("--plot", action="store_true", help="draw curves.png at each evaluation and at the end (matplotlib)")
    add("--plot-run", metavar="RUN_DIR", help="only draw RUN_DIR/curves.png from its CSV files, then exit")
    add("--benchmark", action="store_true", help="time each layer, the update and the emulator, then this "
        "run end to end (without evaluations or checkpoints)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot_run:
        return args
    atari = is_atari(args.env)
    for name, defaults in HYPERPARAMETERS.items():
        if getattr(args, name) is None:
            setattr(args, name, defaults[0 if atari else 1])
    args.clip_rewards = atari if args.clip_rewards is None else args.clip_rewards
    positive = "total_steps buffer_size batch_size lr eps_decay_steps train_freq num_envs eval_episodes"
    probabilities = "gamma eps_start eps_end eval_eps"
    zero_is_off = "target_update eval_every save_every"
    checks = [(n, getattr(args, n) > 0, "must be > 0") for n in positive.split()]
    checks += [(n, 0 <= getattr(args, n) <= 1, "must be in [0, 1]") for n in probabilities.split()]
    checks += [(n, getattr(args, n) >= 0, "must be >= 0") for n in zero_is_off.split()]
    checks += [
        ("batch_size", args.batch_size <= args.buffer_size, "must be at most --buffer-size"),
        ("learning_starts", args.learning_starts >= args.batch_size, "must be at least --batch-size"),
        ("load", args.load or not args.eval_only, "is required with --eval-only"),
        ("device", args.device != "gpu" or mx.is_available(mx.gpu), "gpu: MLX has no GPU backend here"),
    ]
    for name, ok, why in checks:
        if not ok:  # one line, without argparse's usage block
            raise UserError(f"argument --{name.replace('_', '-')}: {why}")
    return args


# ------------------------------------------------------------------------------------------- Q-network
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
        # On a GPU, MLX's own convolution kernels are the natural choice. On the CPU, StridedConv (near the
        # end of the file) computes the same function with faster gradients; its first layer reads the frames
        # channels-first, as they arrive, which spares one transposition.
        self.on_cpu = mx.default_device() == mx.cpu
        self.convs = [StridedConv(i, o, k, s, channels_first=i == chans[0]) if self.on_cpu
                      else nn.Conv2d(i, o, k, s) for i, (o, k, s) in zip(chans[:-1], convs, strict=True)]
        self.fc = Linear(flat, hidden)
        self.out = Linear(hidden, num_actions)

    def pixels(self, x):
        """conv1's input. B batch, 4 stacked frames; pixels arrive as uint8 and become [0, 1] only here."""
        x = x.astype(mx.float32) / 255.0  # (B, 4, 84, 84)
        # nn.Conv2d is channels-last: (B, 4, 84, 84) -> (B, 84, 84, 4).
        return x if self.on_cpu else x.transpose(0, 2, 3, 1)

    def __call__(self, x):
        x = self.pixels(x)
        for conv in self.convs:  # nips: -> (B, 20, 20, 16) -> (B, 9, 9, 32); nature adds -> (B, 7, 7, 64)
            x = nn.relu(conv(x))
        x = nn.relu(self.fc(x.reshape(x.shape[0], -1)))  # (B, 2592 or 3136) -> (B, 256 or 512)
        return self.out(x)  # (B, num_actions)


class MLPQNetwork(nn.Module):
    """For vector observations (CartPole and friends): two hidden layers of 128 rectifier units."""

    def __init__(self, obs_dim, num_actions):
        super().__init__()
        self.layers = [Linear(obs_dim, 128), Linear(128, 128), Linear(128, num_actions)]

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1).astype(mx.float32)  # (B, 1, obs_dim) -> (B, obs_dim)
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)  # (B, num_actions)


def make_q_network(env, arch):
    n = env.num_actions
    return AtariQNetwork(n, arch) if env.atari else MLPQNetwork(env.obs_shape[0], n)


class Linear(nn.Module):
    """nn.Linear's function and init with the weight stored (in, out), y = x @ W + b: nn.Linear's (out, in)
    weight gets a transposed gradient, on which MLX's CPU runs Adam about 15x slower (README)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        scale = in_dim ** -0.5
        self.weight = mx.random.uniform(-scale, scale, (in_dim, out_dim))
        self.bias = mx.random.uniform(-scale, scale, (out_dim,))

    def __call__(self, x):
        return x @ self.weight + self.bias


# ------------------------------------------------------------------------------------------ replay memory
class Replay:
    """Mnih et al. 2013, sec. 4: "we store the agent's experiences at each time-step, e_t = (s_t, a_t, r_t,
    s_t+1) in a data-set D [...] In practice, our algorithm only stores the last N experience tuples."

    Each frame is stored once: a stack phi(s_t) is rebuilt at sample time from the frames t-3..t, and s_t+1
    from t-2..t+1, so 1M Atari transitions take 7.1 GB instead of 56 GB. All envs step together, so slot t
    holds the frame of every env at agent step t: frames has shape (slots, num_envs, *frame_shape). Slot t
    also holds the action taken from it and what followed; `first` marks the first frame of a game, before
    which a stack shows zeros, as the environment did when the agent acted.
    """

    def __init__(self, capacity, num_envs, frame_shape, dtype, stack):
        self.slots, self.num_envs, self.stack = capacity // num_envs, num_envs, stack
        shape = (self.slots, num_envs)
        self.frames = np.zeros(shape + tuple(frame_shape), dtype)
        self.action = np.zeros(shape, np.int32)
        self.reward = np.zeros(shape, np.float32)
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

    def add(self, action, reward, terminated, next_frame, new_game):
        """Completes the transitions from the last frame and stores the next one. Where `new_game`, the step
        ignored its action and next_frame starts a new game: no transition joins the two games."""
        t = (self.pos - 1) % self.slots
        self.action[t], self.reward[t], self.terminated[t] = action, reward, terminated
        self._write(next_frame, new_game)
        self.valid[t] = ~new_game

    def sample(self, batch_size, rng):
        """Draws valid (slot, env) pairs uniformly: "we apply Q-learning updates, or minibatch updates, to
        samples of experience, e ~ D, drawn at random from the pool of stored samples" (2013, sec. 4)."""
        slots, envs = np.empty(0, np.int64), np.empty(0, np.int64)
        filled = self.slots if self.full else self.pos
        while len(slots) < batch_size:
            t, e = rng.integers(filled, size=2 * batch_size), rng.integers(self.num_envs, size=2 * batch_size)
            # When full, the oldest stack-1 slots have lost their history to the newest frames.
            keep = self.valid[t, e] & ((t - self.pos) % self.slots >= self.stack - 1 if self.full else True)
            slots, envs = np.concatenate([slots, t[keep]]), np.concatenate([envs, e[keep]])
        return self.gather(slots[:batch_size], envs[:batch_size])

    def gather(self, slots, envs):
        """x (B, stack+1, *frame_shape) holding s = x[:, :-1] and s' = x[:, 1:]; a, r, terminated (B,)."""
        idx = (slots[:, None] + np.arange(1 - self.stack, 2)) % self.slots  # (B, stack+1): slots t-3 .. t+1
        x = self.frames[idx, envs[:, None]]  # (B, stack+1, *frame_shape)
        # Frame t-3+k is hidden if a game starts in a later slot up to t: (B, stack-1).
        starts = self.first[idx[:, 1:self.stack], envs[:, None]]
        hidden = np.logical_or.accumulate(starts[:, ::-1], axis=1)[:, ::-1]
        x[:, :self.stack - 1][hidden] = 0
        return x, self.action[slots, envs], self.reward[slots, envs], self.terminated[slots, envs]


# ------------------------------------------------------------------------------------------ exploration
def epsilon(step, args):
    """Mnih et al. 2013, sec. 5: "epsilon annealed linearly from 1 to 0.1 over the first million frames, and
    fixed at 0.1 thereafter." Counted from --learning-starts, as the released code does; a pure function of
    the step, so a resumed run continues where it stopped."""
    progress = max(0, step - args.learning_starts) / args.eps_decay_steps
    return args.eps_end + (args.eps_start - args.eps_end) * max(0.0, 1.0 - progress)


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


def make_optimizer(lr):
    """Adam as PyTorch's (CleanRL's) with Rainbow's eps. MLX's Adam skips bias correction unless asked: its
    first steps would then be up to 6.5x the learning rate."""
    return FlushedAdam(learning_rate=lr, eps=1.5e-4, bias_correction=True)


class FlushedAdam(optim.Adam):
    """Adam with moments below 1e-30 set to zero. Where a weight's gradient stays zero (a dead unit, a pixel
    that never changes), its moments shrink by beta each step into subnormal floats, on which x86 CPUs are
    about 100x slower: 26% of them were subnormal 400k steps into MsPacman, and the update took twice as long
    (README). A moment that small moves its weight by far less than float32 can represent."""

    def apply_single(self, gradient, parameter, state):
        for moment in ("m", "v"):  # flushed as they are read, inside Adam's one fused elementwise kernel
            state[moment] = mx.where(mx.abs(state[moment]) < 1e-30, 0.0, state[moment])
        return super().apply_single(gradient, parameter, state)


def make_train_step(q, target, opt, gamma, double, compile=True):
    """One gradient step on a minibatch. Returns (loss, mean max_a Q(s, a)), both lazy MLX scalars."""

    def loss_fn(s, a, y):
        q_values = q(s)  # (B, num_actions)
        q_sa = mx.take_along_axis(q_values, a[:, None], axis=1)[:, 0]  # (B,)
        # Mnih et al. 2015: "clip the error term from the update [...] to be between -1 and 1", i.e. Huber.
        return nn.losses.huber_loss(q_sa, y, delta=1.0, reduction="mean"), q_values.max(axis=1).mean()

    loss_and_grad = nn.value_and_grad(q, loss_fn)
    # MLX keeps freed buffers for reuse up to a cache limit, 32 MiB on this CPU. An update cycles through up
    # to 90 MiB of temporaries, so it gave them back to the OS and page-faulted ~850 times to get them again:
    # 5-10% of the update (README). Raised, never lowered: a GPU's limit is higher.
    mx.set_cache_limit(max(mx.set_cache_limit(128 << 20), 128 << 20))

    def step(x, a, r, terminated):
        s, s_next = x[:, :-1], x[:, 1:]  # (B, stack, ...) each; they share stack-1 frames
        q_next_online = q(s_next) if double else None
        # 2013, sec. 3: "The parameters from the previous iteration theta_i-1 are held fixed when optimising
        # the loss function L_i(theta_i)". y is computed here, outside loss_fn, so no gradient flows into it.
        y = td_target(target(s_next), q_next_online, r, terminated, gamma, double)
        (loss, max_q), grads = loss_and_grad(s, a, y)
        opt.update(q, grads)
        return loss, max_q

    if not compile:
        return step
    # Everything the step reads that changes between calls is captured: online net, target net, optimizer.
    state = [q.state, target.state, opt.state]
    return mx.compile(step, inputs=state, outputs=state)


def sync_target(q, target):
    """Mnih et al. 2015: "every C updates we clone the network Q to obtain a target network Q^" (C counted in
    agent steps, as the released code does). MLX arrays are immutable, so sharing them is a copy: the
    optimizer replaces q's arrays, never edits them."""
    target.update(q.parameters())  # without a target network, Q takes its own weights: a no-op


# ---------------------------------------------------------------------------------------- training loop
def train(args, log=print):
    """Mnih et al. 2013, Algorithm 1 (deep Q-learning with experience replay), with a target network.
    Writes config.json, metrics.csv, eval.csv and checkpoints into the run dir; returns a summary dict."""
    env = Env(args.env, args.num_envs, train=True)
    replay = make_replay(env, args)  # refused before anything is written when it cannot fit
    q, target, opt = make_learner(env, args)
    meta = load_checkpoint(args.load, q, target, opt, identity(env, args), args.lr) if args.load else {}
    run_dir = make_run_dir(args, meta)
    rng = np.random.default_rng(args.seed)
    step, episodes = (meta["step"], meta["episodes"]) if meta.get("full") else (0, 0)
    if meta.get("full"):  # resuming: counters and random stream go on; the replay refills first
        rng.bit_generator.state = meta["rng"]
    log(banner(env, args, run_dir, step))
    train_step, q_act = make_train_step(q, target, opt, args.gamma, args.double), compiled_q(q)
    progress = Progress(run_dir, step, episodes, args.num_envs, log)
    # Without evaluations, no held-out states either: collecting them costs 500 emulator steps on Atari.
    evaluator = Evaluator(args, q, run_dir, log, env.atari) if args.eval_every else None
    obs = env.reset(seed=args.seed + step)  # (N, 4, 84, 84) uint8 or (N, obs_dim)
    replay.start(env.newest_frame(obs))
    next_update, next_sync = step + args.learning_starts, step + args.target_update
    with stop_on_signals() as stopped:
        while step < args.total_steps and not stopped:
            eps = epsilon(step, args)
            actions = act(q_act, obs, eps, rng, env.num_actions)
            env.send(actions)  # the emulators step in ale-py's threads while we learn
            while step >= next_update:  # one update per --train-freq agent steps
                x, a, r, term = replay.sample(args.batch_size, rng)  # x: (B, 5, 84, 84) uint8; a, r: (B,)
                loss, max_q = train_step(mx.array(x), mx.array(a), mx.array(r), mx.array(term, mx.float32))
                mx.eval(loss, max_q, q.state, opt.state)  # sync point: one per update
                progress.update(loss.item(), max_q.item(), step)
                next_update += args.train_freq
            obs, reward, terminated, new_game = env.recv()
            # Mnih et al. 2013, sec. 5: "we fixed all positive rewards to be 1 and all negative rewards to be
            # -1, leaving 0 rewards unchanged." The learner sees the clipped reward; the logs the real score.
            learned = np.clip(reward, -1, 1) if args.clip_rewards else reward
            replay.add(actions, learned, terminated, env.newest_frame(obs), new_game)
            prev, step = step, step + int((~new_game).sum())  # a step that only starts a new game is no step
            progress.record(step, reward, new_game, eps)
            if args.target_update and step >= next_sync:
                sync_target(q, target)
                next_sync += args.target_update
            if crossed(prev, step, args.eval_every):
                evaluator(step)
            if crossed(prev, step, args.save_every):
                save_checkpoint(run_dir, q, target, opt, identity(env, args), step, progress.episodes, rng)
    env.close()
    save_checkpoint(run_dir, q, target, opt, identity(env, args), step, progress.episodes, rng)
    if stopped:
        log(f"stopped by signal at step {step:,}; checkpoint saved in {run_dir}")
        raise SystemExit(128 + stopped[0])
    log(f"done: {step:,} steps; peak memory {peak_rss() / 1e9:.2f} GB; model in {run_dir}/model.safetensors")
    if evaluator and (not evaluator.rows or evaluator.rows[-1]["step"] != step):
        evaluator(step)  # a final evaluation, unless one just ran
    if args.plot:
        plot_run(run_dir)
    return dict(step=step, episodes=progress.episodes, evals=evaluator.rows if evaluator else [],
                run_dir=run_dir)


def crossed(prev, step, every):
    """Did the step counter pass a multiple of `every` (0 = never)? Parallel envs advance it by N at once."""
    return every > 0 and step // every > prev // every


def make_learner(env, args):
    """Q(theta), the target Q(theta^-) and the optimizer; without a target network the target is Q itself."""
    mx.random.seed(args.seed)
    q = make_q_network(env, args.arch)
    target = q if args.target_update == 0 else make_q_network(env, args.arch)
    sync_target(q, target)
    opt = make_optimizer(args.lr)
    opt.init(q.trainable_parameters())
    mx.eval(q.parameters(), target.parameters(), opt.state)
    return q, target, opt


@contextlib.contextmanager
def stop_on_signals():
    """Ctrl-C and SIGTERM only note the signal: the loop ends its step, the caller saves and exits."""
    stopped = []
    signals = (signal.SIGINT, signal.SIGTERM)
    handlers = {s: signal.signal(s, lambda num, _: stopped.append(num)) for s in signals}
    try:
        yield stopped
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


class Progress:
    """One metrics.csv row per finished game (real score) and a progress line every few seconds."""

    def __init__(self, run_dir, step, episodes, num_envs, log):
        self.csv = CsvLog(run_dir / "metrics.csv", ["step", "episode", "episodic_return", "episode_length",
                                                     "epsilon", "loss", "avg_max_q"])
        self.run_dir, self.episodes, self.log = run_dir, episodes, log
        self.score, self.length = np.zeros(num_envs), np.zeros(num_envs, np.int64)
        self.returns, self.losses, self.qs, self.loss, self.q = [], [], [], float("nan"), float("nan")
        self.t_line, self.step_line = time.time(), step

    def record(self, step, reward, new_game, eps):
        """Where new_game, the game played so far ended at the previous step; this step's reward is 0."""
        for i in np.flatnonzero(new_game):
            self.episodes += 1
            self.returns = (self.returns + [float(self.score[i])])[-20:]
            self.csv.write(step=step, episode=self.episodes, episodic_return=float(self.score[i]),
                           episode_length=int(self.length[i]), epsilon=eps, loss=self.loss, avg_max_q=self.q)
        self.score = np.where(new_game, 0, self.score + reward)
        self.length = np.where(new_game, 0, self.length + 1)
        if time.time() - self.t_line > 5:
            sps = (step - self.step_line) / (time.time() - self.t_line)
            ret = f"{np.mean(self.returns):.1f}" if self.returns else "-"
            loss = f"{np.mean(self.losses):.4f} | q {np.mean(self.qs):.3f}" if self.losses else "- | q -"
            self.log(f"step {step:,} | {sps:.0f} sps | episodes {self.episodes} | return {ret} | "
                     f"eps {eps:.3f} | loss {loss}")
            self.t_line, self.step_line, self.losses, self.qs = time.time(), step, [], []

    def update(self, loss, q, step):
        if not (np.isfinite(loss) and np.isfinite(q)):
            raise UserError(f"the loss became {loss} (Q {q}) at step {step:,}; the last good checkpoint in "
                            f"{self.run_dir} is kept; try a lower --lr", code=1)
        self.loss, self.q = loss, q
        self.losses.append(loss)
        self.qs.append(q)


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

    recv() returns the real reward, `terminated` (stops bootstrapping: during Atari training also a lost life)
    and `new_game`. With next-step autoreset, the step after a game ends (game over or time limit) ignores its
    action and returns the first observation of a new game: that step is `new_game`, and no agent step.
    """

    def __init__(self, env_id, num_envs, train):
        self.atari = is_atari(env_id)
        if self.atari:
            self.vec = make_atari(env_spec(env_id), num_envs, train)
        else:
            try:
                self.vec = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync")
            except Exception as e:  # a missing optional dependency (box2d, mujoco, ...) lands here
                raise UserError(f"cannot create {env_id}: {str(e).splitlines()[0]}") from None
        obs, act_space = self.vec.single_observation_space, self.vec.single_action_space
        if not isinstance(act_space, gym.spaces.Discrete):
            kind = type(act_space).__name__
            raise UserError(f"{env_id} has a {kind} action space; DQN needs discrete actions")
        if not self.atari and not (isinstance(obs, gym.spaces.Box) and len(obs.shape) == 1):
            raise UserError(f"{env_id} has observations of shape {obs.shape}; supported are Atari games "
                            "and tasks with a flat vector observation")
        self.num_envs, self.num_actions = num_envs, int(act_space.n)
        self.obs_shape, self.obs_dtype = obs.shape, obs.dtype  # Atari: (4, 84, 84) uint8
        # The replay stores one frame per step: Atari's newest (84, 84) frame of the stack, or the vector.
        self.stack = obs.shape[0] if self.atari else 1
        self.frame_shape = obs.shape[1:] if self.atari else obs.shape

    def newest_frame(self, obs):
        return obs[:, -1] if self.atari else obs  # (N, 84, 84) or (N, obs_dim)

    def reset(self, seed):
        obs, info = self.vec.reset(seed=seed)
        self.frame_number, self.ended = info.get("episode_frame_number"), np.zeros(self.num_envs, bool)
        return obs

    def send(self, actions):
        """Starts the step; Atari emulators run in ale-py's threads until recv()."""
        if self.atari:
            self.vec.send(actions)
        else:
            self.pending = actions

    def recv(self):
        if self.atari:
            obs, reward, terminated, truncated, info = self.vec.recv()
            # The episode frame counter going back is the one exact sign of a new game: `lives == 0` misses a
            # life lost on the frame that reaches the time limit, and games whose lives never change.
            frame_number = info["episode_frame_number"]
            new_game, self.frame_number = frame_number <= self.frame_number, frame_number
        else:
            obs, reward, terminated, truncated, _ = self.vec.step(self.pending)
            new_game, self.ended = self.ended, terminated | truncated
        return obs, reward, terminated, new_game

    def step(self, actions):
        self.send(actions)
        return self.recv()

    def close(self):
        self.vec.close()


def make_atari(spec, num_envs, train):
    """ale-py's native, threaded preprocessing, set as gymnasium registers the id (sticky actions, actions).

    Mnih et al. 2013, sec. 4.1: "The raw frames are preprocessed by first converting their RGB representation
    to gray-scale and down-sampling it to a 110x84 image [...] cropping an 84x84 region"; ALE resizes straight
    to 84x84 as the 2015 code did, and stacks "the last 4 frames of a history" into phi.
    """
    from ale_py.vector_env import AtariVectorEnv

    kwargs, skip = spec.kwargs, spec.kwargs.get("frameskip", 4)
    return AtariVectorEnv(
        kwargs["game"], num_envs,
        # NoFrameskip ids (frameskip=1) expect the agent's wrapper to skip; v0/v4 ids sample a random skip.
        frameskip=skip if isinstance(skip, int) and skip > 1 else 4,
        repeat_action_probability=kwargs.get("repeat_action_probability", 0.0),
        full_action_space=kwargs.get("full_action_space", False),
        # Nature 2015 evaluation: "each episode [...] for up to 5 min" = 18,000 frames at 60 Hz.
        max_num_frames_per_episode=kwargs.get("max_num_frames_per_episode", 108_000) if train else 18_000,
        noop_max=30,
        # Not episodic_life=True: it resets the whole game at each lost life, so the agent would never see
        # its second life. life_loss_info reports `terminated` at each lost life while the game goes on.
        episodic_life=False, life_loss_info=train,
        reward_clipping=False,  # clipped by the learner, so that the logs show the real score
    )


def memory_available():
    """Bytes of memory free for the replay: MemAvailable on Linux, elsewhere (macOS) half the physical memory,
    so that an 8 GB machine refuses a 7 GB replay instead of swapping."""
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def make_replay(env, args):
    """The replay for this env, refused before any allocation when it cannot fit in memory."""
    need, have = Replay.nbytes(args.buffer_size, env.frame_shape, env.obs_dtype), memory_available()
    if need > have:
        raise UserError(f"a replay of {args.buffer_size:,} transitions needs {need / 1e9:.1f} GB but "
                        f"{have / 1e9:.1f} GB is available; lower --buffer-size")
    if args.buffer_size // args.num_envs < env.stack + 2:
        raise UserError(f"--buffer-size {args.buffer_size} leaves fewer than {env.stack + 2} slots per env")
    return Replay(args.buffer_size, args.num_envs, env.frame_shape, env.obs_dtype, env.stack)


def make_run_dir(args, meta):
    """--run-dir, else the directory of a checkpoint being resumed (its CSV files go on), else a new one."""
    default = Path(args.load).parent if meta.get("full") else Path(
        f"runs/{args.env.replace('/', '_')}-{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = Path(args.run_dir or default)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(vars(args), indent=2))
    except OSError as e:
        raise UserError(f"run dir {run_dir} is not writable: {e.strerror}", code=1) from None
    return run_dir


def banner(env, args, run_dir, step):
    size = Replay.nbytes(args.buffer_size, env.frame_shape, env.obs_dtype) / 1e9
    line = (f"env {args.env}: {env.num_actions} actions, obs {env.obs_shape} | "
            f"device {mx.default_device()} | "
            f"BLAS {BLAS or 'reference (slow)'} | replay {args.buffer_size:,} transitions = {size:.2f} GB | "
            f"run dir {run_dir}")
    if step:
        line += (f"\nresumed at step {step:,}, epsilon {epsilon(step, args):.3f}; learning resumes after "
                 f"{args.learning_starts:,} new steps refill the replay")
    return line + (f"\nhint: {BLAS_HINT}" if BLAS is None and mx.default_device() == mx.cpu else "")


def peak_rss():
    """Peak resident memory of this process, in bytes (Linux counts kilobytes, macOS bytes)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# ---------------------------------------------------------------------------------------- checkpoints
def identity(env, args):
    """What a checkpoint must match to be loaded into this run."""
    return {"env": args.env, "arch": args.arch if env.atari else "mlp", "num_actions": env.num_actions}


def atomic_save(path, arrays, metadata):
    """Temporary file, fsync, rename: a crash or a full disk mid-write leaves the previous file intact."""
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


def save_checkpoint(run_dir, q, target, opt, ident, step, episodes, rng):
    """checkpoint.safetensors resumes a run (both nets, optimizer, counters, RNG state); model.safetensors
    holds the Q weights alone, loadable by any MLX user with `model.load_weights`."""
    meta = {"dqn": json.dumps(dict(ident, step=step, episodes=episodes, rng=rng.bit_generator.state))}
    state = {"q": q.parameters(), "target": target.parameters(), "opt": opt.state}
    atomic_save(Path(run_dir) / "checkpoint.safetensors", dict(tree_flatten(state)), meta)
    atomic_save(Path(run_dir) / "model.safetensors", dict(tree_flatten(q.parameters())), meta)


def load_checkpoint(path, q, target, opt, expect, lr):
    """Loads weights (and, from a full checkpoint, target and optimizer); returns the saved metadata.
    The learning rate stays the one given now: a resumed run may change --lr."""
    if not Path(path).is_file():
        raise UserError(f"--load {path}: no such file")
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
        meta = json.loads(metadata["dqn"]) if "dqn" in metadata else {}
    except Exception:
        raise UserError(f"--load {path}: not a readable safetensors file (cut short, or another format)") \
            from None
    saved = {k: meta.get(k, "?") for k in expect}
    if saved != expect:
        def describe(d):
            return ", ".join(f"{k}={v}" for k, v in d.items())

        raise UserError(f"--load {path}: saved for {describe(saved)}, but this run has {describe(expect)}")
    state = tree_unflatten(list(arrays.items()))
    full = "q" in state  # a checkpoint to resume, not only weights to start from
    try:
        q.load_weights(tree_flatten(state["q"] if full else state))
        if full and target is not q:
            target.load_weights(tree_flatten(state["target"]))
        if full:
            opt.state = dict(state["opt"], learning_rate=mx.array(lr))
    except ValueError as e:
        raise UserError(f"--load {path}: does not match the network: {str(e).splitlines()[0]}") from None
    if not full:
        sync_target(q, target)
    return dict(meta, full=full)


# -------------------------------------------------------------------------------------------- evaluation
def evaluate(q, env_id, episodes, seed, eps):
    """Mnih et al. 2015: "The trained agents were evaluated by playing each game 30 times for up to 5 min
    each time with different initial random conditions ('no-op') and an epsilon-greedy policy with epsilon =
    0.05." One env per episode, in a separate instance: the training game in flight is never touched, and
    short episodes are not over-counted. Returns the real (unclipped) score of each episode."""
    env, rng = Env(env_id, episodes, train=False), np.random.default_rng(seed)
    obs = env.reset(seed=seed)
    returns, running = np.full(episodes, np.nan), np.zeros(episodes)
    while np.isnan(returns).any():
        obs, reward, _, new_game = env.step(act(q, obs, eps, rng, env.num_actions))
        first_end = new_game & np.isnan(returns)
        returns[first_end] = running[first_end]
        running += reward
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


class Evaluator:
    """Runs the evaluation protocol, logs it to eval.csv with the average max Q on held-out states."""

    def __init__(self, args, q, run_dir, log, atari):
        self.args, self.q, self.run_dir, self.log, self.rows = args, q, run_dir, log, []
        self.states = held_out_states(args.env, 500 if atari else 100, args.seed + 2)
        columns = ["step", "mean_return", "std_return", "episodes", "avg_max_q"]
        self.csv = CsvLog(run_dir / "eval.csv", columns)

    def __call__(self, step):
        returns = evaluate(self.q, self.args.env, self.args.eval_episodes, self.args.seed + 1 + step,
                           self.args.eval_eps)
        avg_max_q = float(self.q(mx.array(self.states)).max(axis=1).mean())  # sync point
        row = dict(step=step, mean_return=float(returns.mean()), std_return=float(returns.std()),
                   episodes=len(returns), avg_max_q=avg_max_q)
        self.csv.write(**row)
        self.rows.append(row)
        self.log(f"eval at step {step:,}: return {row['mean_return']:.1f} +- {row['std_return']:.1f} over "
                 f"{len(returns)} episodes (epsilon {self.args.eval_eps}) | avg max Q {avg_max_q:.3f}")
        if self.args.plot:
            plot_run(self.run_dir)
        return row


def evaluate_only(args, log=print):
    """--eval-only: one evaluation of the weights given by --load, logged to eval.csv."""
    env = Env(args.env, 1, train=False)
    env.close()
    q, target, opt = make_learner(env, args)
    meta = load_checkpoint(args.load, q, target, opt, identity(env, args), args.lr)
    run_dir = make_run_dir(args, meta)
    log(banner(env, args, run_dir, 0))
    return Evaluator(args, q, run_dir, log, env.atari)(meta.get("step", 0))


# -------------------------------------------------------------------------------------------------- plot
def require(package):
    """Imports an optional package lazily; a missing one is a one-line error naming what to install."""
    try:
        return __import__(package)
    except ImportError:
        raise UserError(f"this option needs the package {package}: pip install {package}") from None


def read_run(run_dir):
    """A run's metrics.csv and eval.csv, as functions from a column name to a numpy array."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.csv").exists():
        raise UserError(f"{run_dir} holds no metrics.csv: is it a run directory?")

    def read(name):
        rows = list(csv.DictReader(open(run_dir / name))) if (run_dir / name).exists() else []
        return lambda col: np.array([float(r.get(col) or "nan") for r in rows])  # a missing value: NaN

    return read("metrics.csv"), read("eval.csv")


def last_100(returns):
    """The mean of the last 100 training games at each game (Dopamine reports training returns)."""
    return np.array([returns[max(0, i - 99):i + 1].mean() for i in range(len(returns))])


def plot_run(run_dir):
    """Training return, evaluation return and average max Q against agent steps, like the 2013 Figure 2."""
    require("matplotlib").use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    train_rows, eval_rows = read_run(run_dir)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(train_rows("step"), train_rows("episodic_return"), ".", alpha=0.3, label="one game")
    axes[0].plot(train_rows("step"), last_100(train_rows("episodic_return")), label="mean of the last 100")
    axes[0].legend()
    axes[1].errorbar(eval_rows("step"), eval_rows("mean_return"), yerr=eval_rows("std_return"), marker="o")
    axes[2].plot(eval_rows("step"), eval_rows("avg_max_q"), marker="o")
    titles = ("Training return (real score)", "Evaluation return", "Average max Q, held-out states")
    for ax, title in zip(axes, titles, strict=True):
        ax.set(title=title, xlabel="agent steps")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(run_dir) / "curves.png", dpi=100)
    plt.close(fig)
    return Path(run_dir) / "curves.png"


def run_table(run_dir):
    """One line per evaluation: its mean return and the mean training return of the last 100 games."""
    train_rows, eval_rows = read_run(run_dir)
    steps, means = train_rows("step"), last_100(train_rows("episodic_return"))
    lines = []
    for step, ret, std in zip(*(eval_rows(c) for c in ("step", "mean_return", "std_return")), strict=True):
        train = f"{means[steps <= step][-1]:.1f}" if (steps <= step).any() else "-"
        lines.append(f"step {step:,.0f} | eval return {ret:.1f} +- {std:.1f} | training, last 100: {train}")
    return lines


# ------------------------------------------------------------------------------------ CPU convolutions
# AtariQNetwork's layers on the CPU in place of nn.Conv2d, for speed only (README, Performance).
class StridedConv(nn.Module):
    """A stride-s convolution rewritten as a stride-1 one over s x s blocks (space-to-depth).

    Cut the image into s x s blocks: an 8x8/4 convolution over 84x84 becomes a 2x2/1 convolution over 21x21
    blocks of 4*4*4 = 64 values, which `block_conv` computes as one matrix product. The same function with the
    same (out, kh, kw, in) weights as nn.Conv2d; MLX's CPU computes its gradient 3-50x faster (README).
    With `channels_first`, the input is (B, C, H, W), as the frames arrive: the blocks are then cut straight
    from it, s pixels of a row at a time, instead of after a transposition to channels-last (README).
    A stride-1 layer (the 2015 conv3) has no blocks to cut: `conv_s1` gives it the same gradient.
    """

    def __init__(self, in_ch, out_ch, kernel, stride, channels_first=False):
        super().__init__()
        scale = (in_ch * kernel * kernel) ** -0.5  # nn.Conv2d's init: uniform weights, zero bias
        self.weight = mx.random.uniform(-scale, scale, (out_ch, kernel, kernel, in_ch))
        self.bias = mx.zeros((out_ch,))
        self.stride, self.channels_first = stride, channels_first

    def __call__(self, x):
        (o, k, _, c), s = self.weight.shape, self.stride
        if s == 1:  # (B, H, W, C) -> (B, H-k+1, W-k+1, O)
            return conv_s1(x, self.weight.transpose(1, 2, 3, 0), self.bias)
        n = k // s  # (O, k, k, C) -> (O, n, s, n, s, C): kernel tap (i, j) acts on block (p+i, q+j)
        taps = self.weight.reshape(o, n, s, n, s, c)
        if self.channels_first:  # (B, C, H, W) -> (B, H/s, W/s, C, s, s)
            b, _, h, w = x.shape
            x = x.reshape(b, c, h // s, s, w // s, s).transpose(0, 2, 4, 1, 3, 5)
            taps = taps.transpose(1, 3, 5, 2, 4, 0)  # (n, n, C, s, s, O)
        else:  # (B, H, W, C) -> (B, H/s, W/s, s, s, C)
            b, h, w, _ = x.shape
            x = x.reshape(b, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5)
            taps = taps.transpose(1, 3, 2, 4, 5, 0)  # (n, n, s, s, C, O)
        # Each block's s*s*C values become its channels: (B, H/s, W/s, s*s*C) and (n, n, s*s*C, O).
        blocks, taps = x.reshape(b, h // s, w // s, -1), taps.reshape(n, n, -1, o)
        return block_conv(blocks, taps, self.bias)  # (B, (H-k)/s+1, (W-k)/s+1, O)


@mx.custom_function
def block_conv(x, w, bias):
    """A stride-1 convolution with an n x n kernel, as one matrix product and n*n shifted sums.
    x: (B, H, W, D), w: (n, n, D, O), bias: (O,) -> (B, H-n+1, W-n+1, O)."""
    (b, h, wd, d), (n, _, _, o) = x.shape, w.shape
    z = (x @ w.transpose(2, 0, 1, 3).reshape(d, -1)).reshape(b, h, wd, n, n, o)  # every block times every tap
    oh, ow = h - n + 1, wd - n + 1
    return bias + sum(z[:, i:i + oh, j:j + ow, i, j] for i in range(n) for j in range(n))


@mx.custom_function
def conv_s1(x, w, bias):
    """block_conv's function and gradient, with MLX's own forward (im2col, one product). For conv3's 3x3
    kernel block_conv's one product is 9x wider than x: slower in the whole update, where this is faster."""
    return mx.conv2d(x, w.transpose(3, 0, 1, 2)) + bias  # w: (n, n, D, O) -> nn.Conv2d's (O, n, n, D)


def block_conv_vjp(primals, dy, y):
    # Written by hand: autodiff of block_conv's shifted sums scatters dy into n*n zero arrays the size of z
    # (the 2015 update 30% slower), and of mx.conv2d writes and folds back the gradient of its im2col columns
    # (5% slower). dy: (B, oh, ow, O).
    x, w, bias = primals
    (b, h, wd, d), (n, _, _, o) = x.shape, w.shape
    # Block (p, q) met tap (i, j) at output (p-i, q-j). Put dy on x's H x W grid (zeros where there is no
    # output) and flatten both to rows: that output's row is the block's row minus shift = i*W + j. So for
    # each tap, each gradient is one product of two row ranges, views that the BLAS reads in place: no
    # shifted copy of dy or x is made (README). Rows that reach past an edge meet zeros.
    r, rows, top = n - 1, b * h * wd, (n - 1) * (wd + 1)  # top: the largest shift
    dy_grid = mx.pad(dy, [(0, 0), (0, r), (0, r), (0, 0)]).reshape(rows, o)  # (B*H*W, O)
    xf, taps = x.reshape(rows, d), [(i, j, i * wd + j) for i in range(n) for j in range(n)]
    # dy_grid's last `top` rows are zeros: leaving them out keeps every range of x inside x.
    dw = mx.stack([xf[sh:sh + rows - top].T @ dy_grid[:rows - top] for _, _, sh in taps])  # (n*n, D, O)
    # The input gradient is never evaluated for conv1, whose input is pixels.
    dy_z = mx.concatenate([mx.zeros((top, o)), dy_grid])  # (top + B*H*W, O): block row k reads row k - shift
    dx = mx.zeros((rows, d))
    for i, j, sh in taps:  # (B*H*W, O) @ (O, D), accumulated by the BLAS (mx.addmm: beta = 1)
        dx = mx.addmm(dx, dy_z[top - sh:top - sh + rows], w[i, j].T)
    return dx.reshape(x.shape), dw.reshape(n, n, d, o), dy.reshape(-1, o).sum(axis=0)


block_conv.vjp(block_conv_vjp)  # the gradient of both functions (a decorator would register only one)
conv_s1.vjp(block_conv_vjp)


# ------------------------------------------------------------------------------------------- benchmark
def timed(fn, reps=20):
    """Milliseconds per call of fn, after 3 warm-up calls (the first ones compile)."""
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1000


def layer_profile(q, x):
    """(name, forward ms, backward ms) per layer of the Atari network at this batch, each compiled alone. The
    backward is the gradient of the layer's weights and input (conv1: weights only, its input is pixels) from
    a given output gradient; it needs no forward output, so MLX does not compute one."""
    x = q.pixels(x)  # conv1's input, as in the network
    rows, layers = [], [(f"conv{i + 1}", c) for i, c in enumerate(q.convs)] + [("fc", q.fc), ("out", q.out)]
    for i, (name, layer) in enumerate(layers):
        x = x.reshape(x.shape[0], -1) if name == "fc" else x  # (B, 7, 7, 64) -> (B, 3136)
        params = layer.trainable_parameters()

        def forward(p, inp, layer=layer):
            layer.update(p)
            return layer(inp)

        fwd = mx.compile(forward)
        bwd = mx.compile(mx.grad(lambda p, inp, f=forward: f(p, inp).sum(), argnums=0 if i == 0 else (0, 1)))
        mx.eval(x)
        rows.append((name, timed(lambda f=fwd, p=params, x=x: mx.eval(f(p, x))),
                     timed(lambda g=bwd, p=params, x=x: mx.eval(g(p, x)))))
        layer.update(params)  # tracing left tracers in the layer
        x = nn.relu(layer(x))
    return rows


def benchmark(args, log=print):
    """--benchmark: where an update's time goes, the update alone, the emulator alone, then the run given by
    the flags end to end, in one process (as the README reports them)."""
    env, rng = Env(args.env, args.num_envs, train=True), np.random.default_rng(args.seed)
    log(f"{args.env} | {args.num_envs} env(s) | batch {args.batch_size} | device {mx.default_device()} | "
        f"BLAS {BLAS or 'reference'}")
    env.reset(seed=args.seed)
    ms = timed(lambda: env.step(rng.integers(env.num_actions, size=args.num_envs)), 2000)
    sps = 1000 * args.num_envs / ms
    log(f"environment alone: {sps:,.0f} agent steps/s")
    env.close()
    q, target, opt = make_learner(env, args)  # the very networks and optimizer that training uses
    x = (rng.integers(0, 256, (args.batch_size, env.stack + 1, *env.frame_shape), np.uint8) if env.atari
         else rng.normal(size=(args.batch_size, 2, *env.obs_shape)).astype(np.float32))
    x, a = mx.array(x), mx.array(rng.integers(env.num_actions, size=args.batch_size))
    if env.atari:
        for name, fwd, bwd in layer_profile(q, x[:, :-1]):
            log(f"  {name:6s} forward {fwd:6.2f} ms | backward {bwd:6.2f} ms")
        forward = compiled_q(q)  # compiled, as the update and acting run it (eager: ~15-25% slower)
        log(f"  whole network forward {timed(lambda: mx.eval(forward(x[:, :-1]))):.2f} ms")
    train_step = make_train_step(q, target, opt, args.gamma, args.double)
    ms = timed(lambda: mx.eval(train_step(x, a, mx.zeros(len(a)), mx.zeros(len(a))), q.state, opt.state))
    log(f"update alone ({args.arch if env.atari else 'mlp'}): {ms:.1f} ms = {1000 / ms:.1f} updates/s")
    with tempfile.TemporaryDirectory() as tmp:
        run = argparse.Namespace(**dict(vars(args), eval_every=0, save_every=0, plot=False, run_dir=tmp))
        start = time.perf_counter()
        out = train(run, log=lambda *_: None)
        wall = time.perf_counter() - start
    log(f"end to end: {out['step']:,} agent steps in {wall:.1f} s = {out['step'] / wall:.1f} agent steps/s")
    log(f"peak memory: {peak_rss() / 1e9:.2f} GB")


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.plot_run:
            print("\n".join(run_table(args.plot_run)))
            print(f"wrote {plot_run(args.plot_run)}")
            return 0
        if args.device:
            mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
        if args.plot:
            require("matplotlib")  # checked at start, not after hours of training
        (benchmark if args.benchmark else evaluate_only if args.eval_only else train)(args)
    except KeyboardInterrupt:  # before the training loop's own handler is installed
        print("dqn.py: error: interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"dqn.py: error: {e}", file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
