"""Deep Q-Networks in MLX, in one file you can read top to bottom.

"Playing Atari with Deep Reinforcement Learning" (Mnih et al., 2013), with the target network and clipped
(Huber) error of "Human-level control through deep reinforcement learning" (Mnih et al., 2015).

    python dqn.py --env ALE/Pacman-v5      # train on Atari with the paper's settings; --help lists every flag
    python dqn.py --env CartPole-v1        # learns in a few minutes on 2 CPU cores

An agent step is one action: 4 emulator frames on Atari, so the paper's 10M frames are 2.5M agent steps.

Differences from the papers (paper -> ours -> why):
- Target network, Huber loss: none in 2013 -> both (2015) -> they made DQN stable. `--target-update 0`: 2013.
- Target period C: 10,000 agent steps, as DeepMind's released code (NeuralQLearner.lua) and Dopamine count it.
- Optimizer: 2015's centered RMSProp -> Adam (eps 1.5e-4; lr 1e-4, classic tasks 2.5e-4) -> it did better on
  Asterix and CartPole (README). On Atari its eps exceeds sqrt(v): it steps about lr * m / eps.
- Replay start, discount, train frequency: not in 2013 -> 50,000 / 0.99 / every 4 steps (2015 table).
- Epsilon: over "the first million frames" -> 1M agent steps from the start of learning, as the code counts.
- Reward clipping: Atari only, where "the scale of scores varies greatly from game to game". Logs: real score.
- Life loss: terminal for the learner in training only (2015), and a fresh frame stack, as DeepMind's replay.
- Game start: up to 30 no-op actions (2015) -> FIRE where the game has it, then ale-py's 0-29 no-op frames
  (0-28 after FIRE), at a real game start only: DeepMind's training code also ran them after a lost life.
- Sticky actions: none in the papers -> what the id registers (`-v5`: 0.25, `NoFrameskip-v4`: 0).
- Frame skip: 4, 3 on Space Invaders for its blinking lasers -> 4 (a skip's 2-frame max keeps them visible);
  v0/v4 ids too, which register a random 2-4.
- Training games: cut at 108,000 frames (30 min, as the ids register); the cut is no terminal: it bootstraps.
- Frames: gray 110x84 cropped to 84x84 (2013) -> resized to 84x84, max of the last 2 frames of a skip (2015).
- Classic-control ids (CartPole-v1, ...): an MLP and their own defaults (HYPERPARAMETERS).
"""

import argparse
import contextlib
import csv
import ctypes
import json
import os
import signal
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np


# The Linux mlx[cpu] wheel calls the reference BLAS (4 GFLOP/s). libmlx looks up `cblas_sgemm` when it loads,
# so a fast BLAS loaded globally *before* `import mlx` serves every matrix product instead (15-35x faster).
def load_blas(candidates):
    """The name of the first (name, path) that loads and exports cblas_sgemm, else None."""
    for name, path in candidates:
        with contextlib.suppress(OSError):
            if hasattr(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL), "cblas_sgemm"):
                return name


MKL = [("MKL", str(p)) for p in Path(sys.prefix, "lib").glob("libmkl_rt.so*")]  # `pip install mkl`: first
BLAS = "Accelerate" if sys.platform == "darwin" else load_blas(MKL + [("OpenBLAS", "libopenblas.so.0")])
BLAS_HINT = "`apt-get install libopenblas0-pthread` or `pip install mkl` makes MLX's CPU matmuls ~30x faster"

import gymnasium as gym  # noqa: E402
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402


class UserError(Exception):
    """Bad input (exit 2) or a fault (UserError(message, 1)): one line from main(), never a traceback."""


class WriteError(UserError):
    """A file that cannot be written, as on a full disk (exit 1): training first saves what it still can."""


# ----------------------------------------------------------------------------------------------- flags
# Unset, a hyperparameter takes the paper's value on Atari, and the second (in brackets in --help) on small
# vector tasks (CartPole...), where Atari's would take hours to learn what needs minutes.
HYPERPARAMETERS = {  # flag: (Atari, classic, help)
    "total_steps": (2_500_000, 50_000, "agent steps to train (paper: 10M frames = 2.5M agent steps)"),
    "buffer_size": (1_000_000, 1_000_000, "replay memory N, in transitions (paper: 1M)"),
    "batch_size": (32, 128, "minibatch size (paper: 32; RMSProp's eps is DeepMind's only at 32)"),
    "gamma": (0.99, 0.99, "discount factor (2015: 0.99)"),
    "eps_start": (1.0, 1.0, "initial exploration epsilon (paper: 1.0)"),
    "eps_end": (0.1, 0.05, "final exploration epsilon (paper: 0.1)"),
    "eps_decay_steps": (1_000_000, 10_000, "steps for epsilon to fall, from --learning-starts (paper: 1M)"),
    "learning_starts": (50_000, 1_000, "steps of random play before learning (2015: 50k)"),
    "train_freq": (4, 1, "agent steps between updates (2015: 4)"),
    "target_update": (10_000, 100, "agent steps between target syncs, 0 = no target network (2015: 10k)"),
    # Classic tasks clip at 100, above CartPole's values, so that their rare terminal errors count in full.
    "error_clip": (1.0, 100.0, "Huber's delta: larger TD errors get a constant gradient (2015: 1)"),
    "eval_every": (250_000, 5_000, "agent steps between evaluations, 0 = off"),
    "eval_episodes": (30, 10, "games per evaluation (2015: 30)"),
    "save_every": (250_000, 25_000, "agent steps between checkpoints, 0 = only at the end and on a signal"),
}
OPTIMIZERS = {"adam": (1e-4, 2.5e-4), "rmsprop": (2.5e-4, 2.5e-4)}  # default learning rate: (Atari, classic)


def parse_args(argv=None):
    # No usage block: argparse's errors are one line.
    p = argparse.ArgumentParser(prog="dqn.py", description=__doc__.splitlines()[0], usage=argparse.SUPPRESS)
    add = p.add_argument
    add("--env", default="ALE/Pacman-v5", help="any Atari id, or a vector task: CartPole-v1, Acrobot-v1, ...")
    add("--arch", choices=("nips", "nature"), default="nips", help="Atari network: 2013 (nips) or 2015")
    for name, (atari, classic, text) in HYPERPARAMETERS.items():
        add("--" + name.replace("_", "-"), type=type(atari), help=f"{text}; default {atari:,} ({classic:,})")
    add("--optimizer", choices=OPTIMIZERS, default="adam", help="adam, or rmsprop (2015's, centered)")
    add("--lr", type=float, help="learning rate; default adam 1e-4 (classic 2.5e-4), rmsprop 2.5e-4 (2015)")
    add("--double", action="store_true", help="Double DQN target (van Hasselt et al. 2016)")
    add("--num-envs", type=int, default=1, help="parallel envs; each agent step of each counts")
    add("--seed", type=int, default=1, help="seeds the network, sampling, exploration and the envs")
    add("--run-dir", help="for logs and checkpoints (default: runs/<env>-<seed>-<time>, or --load's)")
    add("--load", help="a checkpoint.safetensors to resume, or a model.safetensors to start from")
    add("--eval-eps", type=float, default=0.05, help="evaluation epsilon (2015: 0.05)")
    add("--eval-only", action="store_true", help="evaluate the model given by --load, then exit")
    add("--plot", action="store_true", help="draw curves.png at each evaluation (needs matplotlib)")
    add("--video", action="store_true", help="save each evaluation's first game as eval-<step>.gif (Atari)")
    args = p.parse_args(argv)
    args.atari = is_atari(args.env)
    for name, defaults in HYPERPARAMETERS.items():
        if getattr(args, name) is None:
            setattr(args, name, defaults[0 if args.atari else 1])
    args.lr = OPTIMIZERS[args.optimizer][0 if args.atari else 1] if args.lr is None else args.lr
    rules = {"must be > 0": (lambda v: v > 0, "total_steps buffer_size batch_size lr eps_decay_steps "
                                              "train_freq num_envs eval_episodes error_clip"),
             "must be in [0, 1]": (lambda v: 0 <= v <= 1, "gamma eps_start eps_end eval_eps"),
             "must be >= 0": (lambda v: v >= 0, "target_update eval_every save_every")}
    checks = [(n, ok(getattr(args, n)), why) for why, (ok, names) in rules.items() for n in names.split()]
    checks += [("batch_size", args.batch_size <= args.buffer_size, "must be at most --buffer-size"),
               ("learning_starts", args.learning_starts >= args.batch_size, "must be at least --batch-size"),
               # A replay needs a state's frames and the next in each env's slots: stack + 2.
               ("buffer_size", args.buffer_size >= args.num_envs * (6 if args.atari else 3), "too small"),
               ("load", args.load or not args.eval_only, "is required with --eval-only"),
               ("video", args.atari or not args.video, "records Atari games only"),
               ("plot", not args.plot or find_spec("matplotlib"), "needs matplotlib: pip install matplotlib"),
               ("video", not args.video or find_spec("PIL"), "needs Pillow: pip install pillow")]
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
        self.convs = [Conv(i, o, k, s) for i, (o, k, s) in zip(chans, convs, strict=False)]  # end of file
        self.convs[0].channels_first = True  # conv1 reads the frames as they arrive, (B, 4, 84, 84)
        self.fc, self.out = Linear(flat, hidden), Linear(hidden, num_actions)

    def __call__(self, x):
        x = x.astype(mx.float32) / 255.0  # (B, 4, 84, 84): pixels stay uint8 until here
        for conv in self.convs:  # nips: -> (B, 20, 20, 16) -> (B, 9, 9, 32); nature adds -> (B, 7, 7, 64)
            x = nn.relu(conv(x))
        return self.out(nn.relu(self.fc(x)))  # (B, 2592 or 3136) -> (B, 256 or 512) -> (B, num_actions)


class Linear(nn.Module):
    """nn.Linear on the input flattened to (B, in), with its weight stored (in, out): MLX's CPU updates a
    weight many times slower when its gradient comes transposed, as nn.Linear's (out, in) one does."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        scale = in_dim ** -0.5  # nn.Linear's init
        self.weight = mx.random.uniform(-scale, scale, (in_dim, out_dim))
        self.bias = mx.random.uniform(-scale, scale, (out_dim,))

    def __call__(self, x):
        return mx.addmm(self.bias, x.reshape(x.shape[0], -1), self.weight)  # bias + x @ W: one BLAS call


def q_network(env, arch):
    """The Atari network, or for vector observations (CartPole...) two hidden layers of 128 rectifiers."""
    if env.atari:
        return AtariQNetwork(env.num_actions, arch)
    return nn.Sequential(Linear(env.obs_shape[0], 128), nn.ReLU(), Linear(128, 128), nn.ReLU(),
                         Linear(128, env.num_actions))


# ------------------------------------------------------------------------------------------ replay memory
class Replay:
    """Mnih et al. 2013, sec. 4: "we store the agent's experiences at each time-step, e_t = (s_t, a_t, r_t,
    s_t+1) in a data-set D [...] In practice, our algorithm only stores the last N experience tuples."

    Each frame is stored once: phi(s_t) is rebuilt from frames t-3..t and s_t+1 from t-2..t+1 when sampled, so
    1M Atari transitions take 7.1 GB, not 56. Slot t of arrays (slots, envs, ...) holds frame t, the action
    taken from it and what followed; `first` marks the first frame of a life."""

    def __init__(self, capacity, num_envs, frame_shape, dtype, stack):
        self.slots, self.num_envs, self.stack = capacity // num_envs, num_envs, stack
        shape = (self.slots, num_envs)
        self.frames = np.zeros(shape + tuple(frame_shape), dtype)
        self.action, self.reward = np.zeros(shape, np.int32), np.zeros(shape, np.float32)
        self.terminated, self.first = np.zeros(shape, bool), np.zeros(shape, bool)
        self.valid = np.zeros(shape, bool)  # a complete transition starts at this slot
        self.pos, self.full = 0, False
        self.nbytes = sum(a.nbytes for a in vars(self).values() if isinstance(a, np.ndarray))

    def add(self, action, reward, terminated, next_frame, new_game):
        """Completes the transitions from the last frames and stores the next, (N, *frame_shape). Where
        `new_game`, the step ignored its action and next_frame starts a game: no transition joins two."""
        t, pos = (self.pos - 1) % self.slots, self.pos
        self.action[t], self.reward[t], self.terminated[t] = action, reward, terminated
        self.valid[t] = ~new_game
        self.frames[pos], self.first[pos], self.valid[pos] = next_frame, new_game | terminated, False
        self.pos, self.full = (pos + 1) % self.slots, self.full or pos + 1 == self.slots

    def sample(self, batch_size, rng):
        """2013, sec. 4: "we apply Q-learning updates, or minibatch updates, to samples of experience, e ~ D,
        drawn at random from the pool of stored samples". Returns x (B, stack+1, *frame) holding s = x[:, :-1]
        and s' = x[:, 1:], and a, r, terminated (B,)."""
        slots, envs = np.empty(0, int), np.empty(0, int)
        while len(slots) < batch_size:
            t = rng.integers(self.slots if self.full else self.pos, size=2 * batch_size)
            e = rng.integers(self.num_envs, size=2 * batch_size)
            # When full, the oldest stack-1 slots have lost their history to the newest frames.
            keep = self.valid[t, e] & ((t - self.pos) % self.slots >= self.stack - 1 if self.full else True)
            slots, envs = np.concatenate([slots, t[keep]]), np.concatenate([envs, e[keep]])
        return self.gather(slots[:batch_size], envs[:batch_size])

    def gather(self, slots, envs):
        idx = (slots[:, None] + np.arange(1 - self.stack, 2)) % self.slots  # (B, stack+1): slots t-3 .. t+1
        x = self.frames[idx, envs[:, None]]  # (B, stack+1, *frame_shape)
        # Frame t-3+k is hidden if a life starts in a later slot up to t: (B, stack-1).
        starts = self.first[idx[:, 1:self.stack], envs[:, None]]
        x[:, :self.stack - 1][np.logical_or.accumulate(starts[:, ::-1], axis=1)[:, ::-1]] = 0
        return x, self.action[slots, envs], self.reward[slots, envs], self.terminated[slots, envs]


# ------------------------------------------------------------------------------------------ exploration
def epsilon(t, start, end, decay_steps):
    """Mnih et al. 2013, sec. 5: "epsilon annealed linearly from 1 to 0.1 over the first million frames, and
    fixed at 0.1 thereafter." t counts from the start of learning, so a resumed run goes on where it was."""
    return end + (start - end) * max(0.0, 1.0 - max(0, t) / decay_steps)


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
    best = (q_next_online if double else q_next_target).argmax(axis=1, keepdims=True)  # a': (B, 1)
    next_value = mx.take_along_axis(q_next_target, best, axis=1)[:, 0]  # (B,)
    return reward + gamma * (1.0 - terminated) * next_value


class FlushedAdam(optim.Adam):
    """Adam whose averages below 1e-30 become zero: where a gradient stays zero (a dead unit, a pixel that
    never changes) they decay into subnormal floats, ~100x slower on x86 CPUs. The weights move the same."""

    def apply_single(self, gradient, parameter, state):
        for key, value in state.items():  # inside Adam's one fused elementwise kernel
            state[key] = mx.where(mx.abs(value) < 1e-30, 0.0, value)
        return super().apply_single(gradient, parameter, state)


class CenteredRMSprop(optim.RMSprop):
    """The 2015 paper's RMSProp as DeepMind's code runs it: g and v average the gradient and its square
    (decay 0.95), and the step is lr * grad / sqrt(v - g^2 + eps). Flushed as Adam is: g under 1e-15 (whose
    square would be subnormal) is read as 0 and v stays above 1e-30; beside eps, neither moves the weights."""

    def init_single(self, parameter, state):
        state["g"], state["v"] = mx.zeros_like(parameter), mx.zeros_like(parameter)

    def apply_single(self, gradient, parameter, state):
        decay, lr = self.alpha, self.learning_rate.astype(gradient.dtype)
        g = mx.where(mx.abs(state["g"]) < 1e-15, 0.0, state["g"])
        g = state["g"] = decay * g + (1 - decay) * gradient
        v = state["v"] = mx.maximum(decay * state["v"] + (1 - decay) * mx.square(gradient), 1e-30)
        return parameter - lr * gradient / mx.sqrt(v - mx.square(g) + self.eps)


def make_learner(env, args):
    """Q(theta), the target Q(theta^-) and the optimizer, from --load if given; without a target network the
    target is Q itself. Also returns the checkpoint's metadata to resume from, or {}."""
    mx.random.seed(args.seed)
    q = q_network(env, args.arch)
    target = q if args.target_update == 0 else q_network(env, args.arch)
    sync_target(q, target)
    if args.optimizer == "rmsprop":  # 2015: "RMSProp [...] minibatches of size 32", decay 0.95 in the code
        # DeepMind's eps is 0.01 inside the root, for a loss summed over 32; for its mean, 0.01 / 32^2 ~ 1e-5
        opt = CenteredRMSprop(args.lr, alpha=0.95, eps=1e-5)
    else:  # MLX's Adam skips bias correction unless asked: its first steps would be 3-6x the rate
        opt = FlushedAdam(args.lr, eps=1.5e-4, bias_correction=True)
    opt.init(q.trainable_parameters())
    mx.eval(q.parameters(), target.parameters(), opt.state)
    return q, target, opt, load_checkpoint(args.load, q, target, opt, args) if args.load else {}


def make_train_step(q, target, opt, gamma, double, delta=1.0, compile=True):
    """One gradient step on a minibatch. Returns (loss, mean max_a Q(s, a)), both lazy MLX scalars."""

    def loss_fn(s, a, y):
        q_values = q(s)  # (B, num_actions)
        q_sa = mx.take_along_axis(q_values, a[:, None], axis=1)[:, 0]  # (B,)
        # Mnih et al. 2015: "clip the error term from the update [...] to be between -1 and 1": Huber, delta 1
        return nn.losses.huber_loss(q_sa, y, delta=delta, reduction="mean"), q_values.max(axis=1).mean()

    loss_and_grad = nn.value_and_grad(q, loss_fn)

    def step(x, a, r, terminated):
        s, s_next = x[:, :-1], x[:, 1:]  # (B, stack, ...) each; they share stack-1 frames
        # 2013, sec. 3: "The parameters from the previous iteration theta_i-1 are held fixed when optimising
        # the loss function L_i(theta_i)". y is computed outside loss_fn, so no gradient flows into it.
        y = td_target(target(s_next), q(s_next) if double else None, r, terminated, gamma, double)
        (loss, max_q), grads = loss_and_grad(s, a, y)
        opt.update(q, grads)
        return loss, max_q

    # Everything the step reads that changes between calls is captured: online net, target net, optimizer.
    state = [q.state, target.state, opt.state]
    return mx.compile(step, inputs=state, outputs=state) if compile else step


def learn(train_step, q, opt, replay, batch_size, rng, step):
    """Algorithm 1: "Sample random minibatch of transitions [...] from D", then one gradient step. Returns the
    loss and mean max Q; a diverged step ends the run before it saves bad weights."""
    x, a, r, term = replay.sample(batch_size, rng)  # x: (B, 5, 84, 84) uint8; a, r, term: (B,)
    loss, max_q = train_step(mx.array(x), mx.array(a), mx.array(r), mx.array(term, mx.float32))
    mx.eval(loss, max_q, q.state, opt.state)  # sync point: one per update
    loss, max_q = loss.item(), max_q.item()
    if not (np.isfinite(loss) and np.isfinite(max_q)):
        raise UserError(f"loss {loss} at step {step:,}: diverged; the last checkpoint stays; lower --lr", 1)
    return loss, max_q


def sync_target(q, target):
    """Mnih et al. 2015: "every C updates we clone the network Q to obtain a target network Q^". MLX arrays
    are immutable, so sharing them is a copy: the optimizer replaces q's arrays, never edits them."""
    target.update(q.parameters())


# ---------------------------------------------------------------------------------------- training loop
def say(line):
    """print, except that a closed pipe or terminal (`| head`) silences the run instead of ending it."""
    try:
        print(line, flush=True)
    except OSError:  # BrokenPipeError, or EIO from a closed terminal: later lines go nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def train(args, log=say):
    """Mnih et al. 2013, Algorithm 1 (deep Q-learning with experience replay), with a target network."""
    env = Env(args.env, args.num_envs, train=True)
    replay = make_replay(env, args)  # refused before anything is written when it cannot fit
    q, target, opt, meta = make_learner(env, args)
    run_dir, step = start_run(env, args, meta, log), meta.get("step", 0)
    log(f"replay {args.buffer_size:,} transitions, {replay.nbytes / 1e9:.2g} GB")
    rng = np.random.default_rng(args.seed)
    rng.bit_generator.state = meta.get("rng", rng.bit_generator.state)  # a resumed run's stream goes on
    train_step = make_train_step(q, target, opt, args.gamma, args.double, args.error_clip)
    q_act = mx.compile(lambda x: q(x), inputs=q.state)  # 25% faster acting, with the weights of each call
    progress = Progress(run_dir, step, meta.get("episodes", 0), args.num_envs, log)
    evaluator = Evaluator(args, q, run_dir, log) if args.eval_every else None
    obs = env.reset(seed=args.seed + step)  # (N, 4, 84, 84) uint8 or (N, obs_dim)
    replay.add(0, 0, False, obs[:, -1] if env.atari else obs, np.ones(args.num_envs, bool))  # first frames
    refill = args.learning_starts if step else 0  # a resumed run refills its replay first, uncounted
    next_update, next_sync = max(step, args.learning_starts), step + args.target_update
    best = meta.get("best", -np.inf)  # the best evaluation so far
    with stop_on_signals() as stopped:
        try:
            while step < args.total_steps and not stopped:
                eps = epsilon(step - args.learning_starts, args.eps_start, args.eps_end, args.eps_decay_steps)
                actions = act(q_act, obs, eps, rng, env.num_actions)
                env.send(actions)  # the emulators step in ale-py's threads while we learn
                while not refill and step >= next_update:  # one update per --train-freq agent steps
                    progress.update(*learn(train_step, q, opt, replay, args.batch_size, rng, step))
                    next_update += args.train_freq
                obs, reward, terminated, new_game = env.recv()
                # 2013, sec. 5: "we fixed all positive rewards to be 1 and all negative rewards to be -1,
                # leaving 0 rewards unchanged." The learner sees the clipped reward; the logs the real score.
                replay.add(actions, np.clip(reward, -1, 1) if env.atari else reward, terminated,
                           obs[:, -1] if env.atari else obs, new_game)
                prev = step
                step += 0 if refill else int((~new_game).sum())  # a step that only starts a game is no step
                refill = max(0, refill - args.num_envs)
                progress.record(step, reward, new_game, eps)
                if args.target_update and step >= next_sync:
                    sync_target(q, target)
                    next_sync += args.target_update
                if evaluator and (crossed(prev, step, args.eval_every) or step >= args.total_steps):
                    row = evaluator(step, stopped)
                    if row and row["mean_return"] > best:  # RL Zoo's best model: kept beside the last one
                        best = row["mean_return"]
                        save_checkpoint(run_dir, q, target, opt, args, rng, step, progress.episodes, best,
                                        ["best"])
                        log(f"best evaluation so far: its weights are in {run_dir / 'best.safetensors'}")
                    if args.plot:
                        plot_run(run_dir)
                if crossed(prev, step, args.save_every):
                    save_checkpoint(run_dir, q, target, opt, args, rng, step, progress.episodes, best)
        except WriteError:  # a full disk: the checkpoint may still fit, and it is what a run needs
            save_checkpoint(run_dir, q, target, opt, args, rng, step, progress.episodes, best)
            raise
    env.vec.close()
    save_checkpoint(run_dir, q, target, opt, args, rng, step, progress.episodes, best)
    if stopped:
        log(f"stopped by signal at step {step:,}; checkpoint saved in {run_dir}")
        raise SystemExit(128 + stopped[0])
    log(f"done: {step:,} steps; model in {run_dir / 'model.safetensors'}")
    return dict(step=step, episodes=progress.episodes, run_dir=run_dir)


def crossed(prev, step, every):
    """Did the step counter pass a multiple of `every` (0 = never)? Parallel envs advance it by N at once."""
    return every > 0 and step // every > prev // every


@contextlib.contextmanager
def stop_on_signals():
    """Ctrl-C, SIGTERM and SIGHUP (a closed terminal) only note the signal: the loop ends its step or its
    evaluation, then train() saves a checkpoint and exits 128 + the signal's number. A second ends it now."""
    stopped, signals = [], (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def note(num, _):
        stopped.append(num)
        for sig in signals:
            signal.signal(sig, signal.SIG_DFL)

    handlers = {sig: signal.signal(sig, note) for sig in signals}
    try:
        yield stopped
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def csv_writer(path, columns):
    """A function appending a row to a CSV file, on disk before the run goes on; a full disk: WriteError."""

    def write(*row):
        try:
            with open(path, "a", newline="") as file:
                if file.tell() == 0:  # a new file, or one left empty by a run killed before its first row
                    csv.writer(file).writerow(columns.split())
                csv.writer(file).writerow(row)
        except OSError as e:
            raise WriteError(f"cannot write {path}: {e.strerror}", 1) from None

    return write


class Progress:
    """metrics.csv: one row per finished game, with its real score. A progress line every 5 seconds."""

    def __init__(self, run_dir, step, episodes, num_envs, log):
        self.write = csv_writer(run_dir / "metrics.csv", "step episode episodic_return episode_length "
                                "epsilon loss avg_max_q")
        self.log = log
        self.episodes, self.returns = episodes, []  # games so far, and the last 20 games' scores
        self.score, self.length = np.zeros(num_envs), np.zeros(num_envs, int)  # each env's game so far
        self.updates, self.last = [], (np.nan, np.nan)  # (loss, max Q): since the last line, the last
        self.t_line, self.step_line = time.time(), step  # when and at which step the last line was

    def update(self, loss, max_q):
        self.last = (loss, max_q)
        self.updates.append(self.last)

    def record(self, step, reward, new_game, eps):
        for i in np.flatnonzero(new_game):  # the game of env i ended at the previous step
            self.episodes += 1
            self.returns = self.returns[-19:] + [self.score[i]]
            self.write(step, self.episodes, self.score[i], self.length[i], eps, *self.last)
        self.score = np.where(new_game, 0, self.score + reward)
        self.length = np.where(new_game, 0, self.length + 1)
        if time.time() - self.t_line > 5:
            sps = (step - self.step_line) / (time.time() - self.t_line)
            loss, q = np.mean(self.updates, axis=0) if self.updates else (np.nan, np.nan)
            learning = f"loss {loss:.4f} | q {q:.3f}" if self.updates else "no updates yet: the replay fills"
            self.log(f"step {step:,} | {sps:.0f} sps | episodes {self.episodes} | return "
                     f"{np.mean(self.returns or np.nan):.1f} | eps {eps:.3f} | {learning}")
            self.t_line, self.step_line = time.time(), step
            self.updates = []


# ----------------------------------------------------------------------------------------- environments
def is_atari(env_id):
    """Whether gymnasium registers `env_id` as an ale-py game; an unknown id is a one-line error."""
    import ale_py

    gym.register_envs(ale_py)
    try:
        return "ale_py" in str(gym.spec(env_id).entry_point)
    except gym.error.Error as e:  # gymnasium's message names the closest id ("Did you mean: ...?")
        raise UserError(f"unknown environment id {env_id!r}: {e}") from None


class Env:
    """N copies of a game, stepped together. recv() returns the observation, the real reward, `terminated`
    (in Atari training also a lost life) and `new_game`: with next-step autoreset, the step after a game ends
    (game over or time limit) ignores its action and starts a new game."""

    def __init__(self, env_id, num_envs, train):
        self.atari, self.num_envs = is_atari(env_id), num_envs
        try:
            self.vec = make_atari(gym.spec(env_id), num_envs, train) if self.atari else gym.make_vec(
                env_id, num_envs, vectorization_mode="sync")
        except Exception as e:  # a missing optional package (box2d, mujoco, ...) lands here
            raise UserError(f"cannot create {env_id}: {str(e).splitlines()[0]}") from None
        obs, actions = self.vec.single_observation_space, self.vec.single_action_space
        if not isinstance(actions, gym.spaces.Discrete):
            raise UserError(f"{env_id} has {type(actions).__name__} actions; DQN needs discrete actions")
        if not (self.atari or isinstance(obs, gym.spaces.Box) and len(obs.shape) == 1):
            raise UserError(f"{env_id} has observations of shape {obs.shape}; dqn.py plays Atari or vectors")
        self.num_actions, self.obs_shape, self.obs_dtype = int(actions.n), obs.shape, obs.dtype
        # The replay stores one frame per step: the newest (84, 84) frame of Atari's 4, or the vector.
        self.stack, self.frame_shape = (obs.shape[0], obs.shape[1:]) if self.atari else (1, obs.shape)

    def reset(self, seed):
        obs, info = self.vec.reset(seed=seed)
        self.frame_number, self.ended = info.get("episode_frame_number"), np.zeros(self.num_envs, bool)
        self.age = np.ones(self.num_envs, int)  # frames of the current life in the stack, up to 4
        return obs

    def send(self, actions):
        self.pending = actions
        if self.atari:  # the emulators run in ale-py's threads until recv()
            self.vec.send(actions)

    def recv(self):
        if not self.atari:
            obs, reward, terminated, truncated, _ = self.vec.step(self.pending)
            new_game, self.ended = self.ended, terminated | truncated
            return obs, reward, terminated, new_game
        obs, reward, terminated, _, info = self.vec.recv()
        # The episode frame counter going back is the one exact sign of a new game: `lives == 0` misses a
        # life lost on the frame that reaches the time limit, and games whose lives never change.
        new_game = info["episode_frame_number"] <= self.frame_number
        self.frame_number = info["episode_frame_number"]
        self.age = np.where(terminated | new_game, 1, np.minimum(self.age + 1, self.stack))
        fresh = np.arange(self.stack) >= self.stack - self.age[:, None]  # (N, 4): frames of this life
        return np.where(fresh[:, :, None, None], obs, 0), reward, terminated, new_game  # older frames: zeros

    def step(self, actions):
        self.send(actions)
        return self.recv()


def make_atari(spec, num_envs, train):
    """ale-py's native, threaded preprocessing, with the id's sticky actions and action set. Mnih et al. 2013,
    sec. 4.1: "The raw frames are preprocessed by first converting their RGB representation to gray-scale and
    down-sampling it to a 110x84 image [...] cropping an 84x84 region"; ALE resizes to 84x84 (2015)."""
    from ale_py.vector_env import AtariVectorEnv

    kwargs, skip = spec.kwargs, spec.kwargs.get("frameskip", 4)
    return AtariVectorEnv(
        kwargs["game"], num_envs,
        frameskip=skip if isinstance(skip, int) and skip > 1 else 4,  # NoFrameskip, v0 and v4 ids: 4
        repeat_action_probability=kwargs.get("repeat_action_probability", 0.0),
        full_action_space=kwargs.get("full_action_space", False),
        # Nature 2015 evaluation: "each episode [...] for up to 5 min" = 18,000 frames at 60 Hz.
        max_num_frames_per_episode=kwargs.get("max_num_frames_per_episode", 108_000) if train else 18_000,
        # Not episodic_life, which resets the whole game at each lost life: the agent would never see its
        # second life. life_loss_info reports `terminated` at each lost life while the game goes on. No
        # reward_clipping: the learner clips, so that the logs show the real score.
        noop_max=30, episodic_life=False, life_loss_info=train, reward_clipping=False)


def make_replay(env, args):
    """The replay, refused before any allocation when it cannot fit in memory (Linux: MemAvailable; else
    half the physical memory, so that an 8 GB Mac refuses a 7 GB replay instead of swapping)."""
    need = args.buffer_size * (int(np.prod(env.frame_shape)) * env.obs_dtype.itemsize + 4 + 4 + 3)
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    with contextlib.suppress(OSError):
        have = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if "MemAvailable" in line)
    if need > have:
        raise UserError(f"a replay of {need / 1e9:.1f} GB; {have / 1e9:.1f} GB free: lower --buffer-size")
    return Replay(args.buffer_size, args.num_envs, env.frame_shape, env.obs_dtype, env.stack)


def start_run(env, args, meta, log):
    """Makes the run dir (--run-dir, --load's own, or a new one), writes config.json (config-<step>.json for
    a run resumed at that step), and logs the banner, which names the BLAS. Returns the run dir."""
    run_dir = Path(args.run_dir or (Path(args.load).parent if meta else Path(
        f"runs/{args.env.replace('/', '_')}-{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not args.eval_only:  # the flags that trained the run; a resumed run's go beside them
            name = f"config-{meta['step']}.json" if meta.get("step") else "config.json"
            (run_dir / name).write_text(json.dumps(vars(args), indent=2))
    except OSError as e:
        raise UserError(f"run dir {run_dir} is not writable: {e.strerror}", 1) from None
    log(f"env {args.env}: {env.num_actions} actions, obs {env.obs_shape} | device {mx.default_device()} "
        f"| BLAS {BLAS or 'reference, slow: ' + BLAS_HINT} | run dir {run_dir}")
    if meta.get("step") and not args.eval_only:
        log(f"resumed at step {meta['step']:,}; {args.learning_starts:,} uncounted steps refill the replay")
    return run_dir


# ---------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(run_dir, q, target, opt, args, rng, step, episodes, best, files=()):
    """checkpoint.safetensors resumes a run (nets, optimizer, counters, RNG); model.safetensors: Q's weights;
    best.safetensors: Q's at the best evaluation. Written, then renamed: a failed write keeps the old."""
    meta = json.dumps(dict(env=args.env, arch=args.arch if args.atari else "mlp", optimizer=args.optimizer,
                           step=step, episodes=episodes, best=best, rng=rng.bit_generator.state))
    full = {"q": q.parameters(), "target": target.parameters(), "opt": opt.state}
    for name in files or ("checkpoint", "model"):
        tree = full if name == "checkpoint" else q.parameters()
        path, tmp = run_dir / f"{name}.safetensors", run_dir / f".{name}.tmp.safetensors"
        try:
            mx.save_safetensors(str(tmp), dict(tree_flatten(tree)), metadata={"dqn": meta})
            os.replace(tmp, path)
        except (OSError, RuntimeError, ValueError) as e:
            tmp.unlink(missing_ok=True)
            raise WriteError(f"cannot write {path}: {e}", 1) from None


def load_checkpoint(path, q, target, opt, args):
    """Loads Q's weights and, from a full checkpoint, the target and the optimizer with the new --lr. Returns
    the metadata (its step, ...), or {} for weights that a new run trains from."""
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
        meta = json.loads(metadata.get("dqn", "{}"))
    except Exception:
        why = "not a safetensors file" if Path(path).is_file() else "no such file"
        raise UserError(f"--load {path}: {why}") from None
    state = tree_unflatten(list(arrays.items()))
    resume = "q" in state and not args.eval_only  # the optimizer state matters only to a resumed run
    expect = dict(env=args.env, arch=args.arch if args.atari else "mlp", optimizer=args.optimizer)
    saved = {k: meta.get(k, "?") for k in expect if k != "optimizer" or resume}
    if saved != {k: expect[k] for k in saved}:
        raise UserError(f"--load {path}: saved for {saved}, but this run has {expect}")
    try:
        q.load_weights(tree_flatten(state.get("q", state)))
        target.load_weights(tree_flatten(state.get("target", state)))
    except ValueError as e:
        raise UserError(f"--load {path}: does not fit the network: {str(e).splitlines()[0]}") from None
    if resume:
        opt.state = dict(state["opt"], learning_rate=mx.array(args.lr))
    return meta if "q" in state or args.eval_only else {}  # weights to train from: a new run


# -------------------------------------------------------------------------------------------- evaluation
class Evaluator:
    """Mnih et al. 2015: "The trained agents were evaluated by playing each game 30 times for up to 5 min
    each time with different initial random conditions ('no-op') and an epsilon-greedy policy with epsilon =
    0.05." One env per game, apart from training's: short games are not over-counted. Logs eval.csv."""

    def __init__(self, args, q, run_dir, log):
        self.args, self.q, self.run_dir, self.log = args, q, run_dir, log
        self.write = csv_writer(run_dir / "eval.csv", "step mean_return std_return episodes avg_max_q")
        # Mnih et al. 2013, sec. 5.1: "we collect a fixed set of states by running a random policy before
        # training starts and track the average of the maximum predicted Q for these states."
        env, rng = Env(args.env, 1, train=False), np.random.default_rng(args.seed + 2)
        states = [env.reset(seed=args.seed + 2)]
        for _ in range(499 if args.atari else 99):
            states.append(env.step(rng.integers(env.num_actions, size=1))[0])
        self.states = mx.array(np.concatenate(states))  # (500 or 100, *obs_shape)
        env.vec.close()

    def __call__(self, step, stopped=()):
        """Plays one game per env to its end and logs the real scores. A signal (in `stopped`) ends the games
        early, with no row: --eval-only can redo it."""
        a, seed = self.args, self.args.seed + 1 + step
        env, rng = Env(a.env, a.eval_episodes, train=False), np.random.default_rng(seed)
        obs = env.reset(seed=seed)
        returns = np.full(a.eval_episodes, np.nan)  # each env's first game's score, once it ends
        running = 0  # each env's score so far
        frames = []  # --video: game 0's newest frames, (84, 84) each
        while np.isnan(returns).any() and not stopped:
            if a.video and np.isnan(returns[0]):
                frames.append(obs[0, -1])
            obs, reward, _, new_game = env.step(act(self.q, obs, a.eval_eps, rng, env.num_actions))
            returns = np.where(new_game & np.isnan(returns), running, returns)
            running = running + reward
        env.vec.close()
        if stopped:
            return None
        if a.video:
            save_gif(frames, self.run_dir / f"eval-{step}.gif")
        row = dict(step=step, mean_return=returns.mean(), std_return=returns.std(), episodes=len(returns),
                   avg_max_q=self.q(self.states).max(axis=1).mean().item())  # sync point
        self.write(*row.values())
        self.log(f"eval at step {step:,}: return {row['mean_return']:.1f} +- {row['std_return']:.1f} over "
                 f"{len(returns)} games (epsilon {a.eval_eps}) | avg max Q {row['avg_max_q']:.3f}")
        return row


def save_gif(frames, path):
    """What the network sees: (84, 84) frames enlarged 2x, one agent step (4 frames at 60 Hz) per 67 ms."""
    from PIL import Image  # Pillow comes with matplotlib

    images = [Image.fromarray(frame).resize((168, 168), Image.NEAREST) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=67)


def plot_run(run_dir):
    """Training return, evaluation return and average max Q against agent steps, like the 2013 Figure 2."""
    from matplotlib.figure import Figure  # not pyplot: no window, and nothing kept once drawn

    def column(name, col):  # a missing value is NaN
        rows = list(csv.DictReader(open(run_dir / name))) if (run_dir / name).exists() else []
        return np.array([float(r.get(col) or "nan") for r in rows])

    steps, returns = column("metrics.csv", "step"), column("metrics.csv", "episodic_return")
    evals = [column("eval.csv", c) for c in ("step", "mean_return", "std_return", "avg_max_q")]
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    axes[0].plot(steps, returns, ".", alpha=0.3)
    axes[0].plot(steps, [returns[max(0, i - 99):i + 1].mean() for i in range(len(returns))])  # last 100
    axes[1].errorbar(*evals[:2], yerr=evals[2], marker="o")
    axes[2].plot(evals[0], evals[3], marker="o")
    for ax, title in zip(axes, ("Training return (one game, last 100)", "Evaluation return",
                                "Average max Q, held-out states"), strict=True):
        ax.set(title=title, xlabel="agent steps")
    fig.savefig(run_dir / "curves.png", dpi=100, bbox_inches="tight")


# ------------------------------------------------------------------------------------ CPU convolutions
class Conv(nn.Conv2d):
    """nn.Conv2d's function, weights and init, computed so that MLX's CPU trains it several times faster: a
    stride-s convolution is a stride-1 one over s x s blocks (space-to-depth). An 8x8/4 convolution over 84x84
    becomes a 2x2/1 convolution over 21x21 blocks of 4*4*4 = 64 values, one matrix product in `block_conv`."""

    channels_first = False  # conv1 reads (B, C, H, W), as the frames arrive, and cuts its blocks from it

    def __call__(self, x):  # (B, H, W, C), or (B, C, H, W) if channels_first -> (B, (H-k)/s+1, (W-k)/s+1, O)
        (o, k, _, c), s = self.weight.shape, self.stride[0]
        n = k // s  # kernel tap (i, j) acts on block (p+i, q+j): (O, k, k, C) -> (O, n, s, n, s, C)
        taps = self.weight.reshape(o, n, s, n, s, c)
        if self.channels_first:  # -> (B, H/s, W/s, C, s, s) and (n, n, C, s, s, O)
            (b, _, h, w), order = x.shape, (0, 2, 4, 1, 3, 5)
            x, taps = x.reshape(b, c, h // s, s, w // s, s), taps.transpose(1, 3, 5, 2, 4, 0)
        else:  # -> (B, H/s, W/s, s, s, C) and (n, n, s, s, C, O)
            (b, h, w, _), order = x.shape, (0, 1, 3, 2, 4, 5)
            x, taps = x.reshape(b, h // s, s, w // s, s, c), taps.transpose(1, 3, 2, 4, 5, 0)
        blocks = x.transpose(order).reshape(b, h // s, w // s, -1)  # a block's s*s*C values are its channels
        return block_conv(blocks, taps.reshape(n, n, -1, o), self.bias)


@mx.custom_function
def block_conv(x, w, bias):
    """A stride-1 convolution with an n x n kernel as one matrix product and n*n shifted sums.
    x: (B, H, W, D), w: (n, n, D, O), bias: (O,) -> (B, H-n+1, W-n+1, O)."""
    (b, h, wd, d), (n, _, _, o) = x.shape, w.shape
    z = (x @ w.transpose(2, 0, 1, 3).reshape(d, -1)).reshape(b, h, wd, n, n, o)  # every block times every tap
    return bias + sum(z[:, i:i + h - n + 1, j:j + wd - n + 1, i, j] for i in range(n) for j in range(n))


@block_conv.vjp
def block_conv_vjp(primals, dy, y):
    """By hand: autodiff would scatter dy into n*n zero arrays the size of z. Put dy (B, oh, ow, O) on x's
    H x W grid (zeros where there is no output) and flatten both to rows: tap (i, j) met block row k at output
    row k - (i*W + j), so each tap's gradients are products of row ranges, read in place by the BLAS."""
    x, w, bias = primals
    (b, h, wd, d), (n, _, _, o) = x.shape, w.shape
    r, rows, top = n - 1, b * h * wd, (n - 1) * (wd + 1)  # top: the largest shift
    dy_grid = mx.pad(dy, [(0, 0), (0, r), (0, r), (0, 0)]).reshape(rows, o)  # (B*H*W, O)
    xf, taps = x.reshape(rows, d), [(i, j, i * wd + j) for i in range(n) for j in range(n)]
    # dy_grid's last `top` rows are zeros: leaving them out keeps every range of x inside x.
    dw = mx.stack([xf[sh:sh + rows - top].T @ dy_grid[:rows - top] for _, _, sh in taps])  # (n*n, D, O)
    dy_z = mx.concatenate([mx.zeros((top, o)), dy_grid])  # (top + B*H*W, O): block row k reads row k - shift
    dx = mx.zeros((rows, d))  # never evaluated for conv1, whose input is pixels
    for i, j, sh in taps:  # (B*H*W, O) @ (O, D), accumulated by the BLAS (mx.addmm: beta = 1)
        dx = mx.addmm(dx, dy_z[top - sh:top - sh + rows], w[i, j].T)
    return dx.reshape(x.shape), dw.reshape(n, n, d, o), dy.reshape(-1, o).sum(axis=0)


def main(argv=None):
    try:
        args = parse_args(argv)
        # An update cycles through ~90 MiB of temporaries; MLX's CPU keeps only 32 MiB of freed buffers.
        default_limit = mx.set_cache_limit(128 << 20)
        mx.set_cache_limit(max(default_limit, 128 << 20))  # a larger default (a GPU's) stays
        if not args.eval_only:
            train(args)
            return 0
        env = Env(args.env, 1, train=False)  # --eval-only: one evaluation of the weights given by --load
        env.vec.close()
        q, _, _, meta = make_learner(env, args)
        run_dir = start_run(env, args, meta, say)
        Evaluator(args, q, run_dir, say)(meta.get("step", 0))
    except KeyboardInterrupt:  # before the training loop's own handler is installed
        print("dqn.py: error: interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"dqn.py: error: {e.args[0]}", file=sys.stderr)
        return e.args[1] if len(e.args) > 1 else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
