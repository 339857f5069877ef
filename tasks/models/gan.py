"""CycleGAN builders and trainer (Keras 3, TensorFlow backend): ResNet generator, PatchGAN, LSGAN + cycle + identity.

Zhu et al. 2017 as used by MelaNet (benign -> malignant translation). Everything takes explicit arguments; Keras and
TensorFlow are imported inside the functions that need them so importing this module costs nothing.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.errors import InputError

# Weight init of the paper (N(0, 0.02)); instance norm = GroupNormalization with one group per channel.
INIT_STDDEV = 0.02
GENERATOR_FILE = "generator_b2m.keras"  # models/cyclegan/<this>: written by cyclegan, read by upsample
NORM_EPSILON = 1e-5


# --------------------------------------------------------------------------- pure helpers
def patchgan_receptive_field(n_downsamples: int, kernel: int = 4) -> int:
    """Receptive field (px) of a PatchGAN with `n_downsamples` stride-2 convs followed by two stride-1 convs."""
    strides = [2] * n_downsamples + [1, 1]
    rf = 1
    for s in reversed(strides):
        rf = (rf - 1) * s + kernel
    return rf


def patchgan_downsamples(image_size: int) -> int:
    """Stride-2 layers so the patch covers the share of the image a 70x70 patch covers of a 256 px image."""
    # 3 downsamples give the paper's 70 px field at 256 px; keep the same field/image ratio at other sizes
    # (nearest in log scale) so a 32 px discriminator judges patches, not the whole image.
    target = 70.0 * image_size / 256.0
    best = min(range(1, 8), key=lambda n: abs(math.log(patchgan_receptive_field(n) / target)))
    while best > 1 and image_size // 2**best < 2:  # keep at least a 2x2 map before the final convs
        best -= 1
    return best


def linear_decay_lr(step: int, total_steps: int, decay_steps: int, base_lr: float) -> float:
    """Constant `base_lr`, then linear decay over the last `decay_steps` steps (the last one trains at base/decay)."""
    if decay_steps <= 0 or step < total_steps - decay_steps:
        return float(base_lr)
    remaining = max(total_steps - step, 0)
    return float(base_lr) * remaining / float(decay_steps)


def pool_query_plan(rng: np.random.Generator, batch: int, pool_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Random numbers the history pool consumes for one batch: a coin per image and a slot to swap with."""
    coins = rng.random(batch).astype(np.float32)
    # Distinct slots within a batch (when the pool is big enough) so vectorised pool writes never collide.
    pool = max(pool_size, 1)
    slots = rng.choice(pool, size=batch, replace=batch > pool).astype(np.int32)
    return coins, slots


def to_unit(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 RGB [0, 255] -> float32 [-1, 1] (the generator's tanh range)."""
    return images_uint8.astype(np.float32) / 127.5 - 1.0


def to_uint8(images_unit: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> uint8 RGB, rounding (not truncating) so a round trip is exact."""
    return np.clip(np.rint((np.asarray(images_unit, dtype=np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- layers and builders
@functools.cache
def _reflection_pad_cls() -> type:
    """The ReflectionPad2D layer class, defined on first use so Keras is imported lazily (registered once)."""
    import keras

    @keras.saving.register_keras_serializable(package="lesionflow")
    class ReflectionPad2D(keras.layers.Layer):
        """Reflection padding: the paper's choice over zero padding, which leaves dark borders in outputs."""

        def __init__(self, pad: int = 1, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.pad = int(pad)

        def call(self, x: Any) -> Any:
            p = self.pad
            return keras.ops.pad(x, [[0, 0], [p, p], [p, p], [0, 0]], mode="reflect")

        def compute_output_shape(self, shape: tuple) -> tuple:
            grow = lambda d: None if d is None else d + 2 * self.pad  # noqa: E731
            return (shape[0], grow(shape[1]), grow(shape[2]), shape[3])

        def get_config(self) -> dict:
            return {**super().get_config(), "pad": self.pad}

    return ReflectionPad2D


def custom_objects() -> dict[str, type]:
    """Custom layers a saved generator needs (pass to keras.saving.load_model / MLflow)."""
    cls = _reflection_pad_cls()
    return {"lesionflow>ReflectionPad2D": cls, "ReflectionPad2D": cls}


def _init() -> Any:
    import keras

    return keras.initializers.RandomNormal(stddev=INIT_STDDEV)


def _inorm(name: str) -> Any:
    import keras

    return keras.layers.GroupNormalization(groups=-1, epsilon=NORM_EPSILON, name=name)


def build_generator(image_size: int, base_filters: int = 64, n_res_blocks: int = 9, name: str = "generator") -> Any:
    """ResNet generator c7s1-f, d2f, d4f, R4f x n, u2f, uf, c7s1-3 (tanh); image_size must be divisible by 4."""
    import keras
    from keras import layers

    if image_size % 4:
        raise InputError(f"generator image_size must be divisible by 4 (two stride-2 downsamples), got {image_size}")
    pad = _reflection_pad_cls()
    f = base_filters
    inp = keras.Input((image_size, image_size, 3), name=f"{name}_image")
    x = pad(3, name=f"{name}_pad_in")(inp)
    x = layers.Conv2D(f, 7, padding="valid", use_bias=False, kernel_initializer=_init(), name=f"{name}_c7")(x)
    x = layers.ReLU(name=f"{name}_c7_relu")(_inorm(f"{name}_c7_norm")(x))
    for i, mult in enumerate((2, 4)):
        x = layers.Conv2D(f * mult, 3, strides=2, padding="same", use_bias=False, kernel_initializer=_init(),
                          name=f"{name}_down{i}")(x)
        x = layers.ReLU(name=f"{name}_down{i}_relu")(_inorm(f"{name}_down{i}_norm")(x))
    for i in range(n_res_blocks):
        y = pad(1, name=f"{name}_res{i}_pad_a")(x)
        y = layers.Conv2D(f * 4, 3, padding="valid", use_bias=False, kernel_initializer=_init(),
                          name=f"{name}_res{i}_conv_a")(y)
        y = layers.ReLU(name=f"{name}_res{i}_relu")(_inorm(f"{name}_res{i}_norm_a")(y))
        y = pad(1, name=f"{name}_res{i}_pad_b")(y)
        y = layers.Conv2D(f * 4, 3, padding="valid", use_bias=False, kernel_initializer=_init(),
                          name=f"{name}_res{i}_conv_b")(y)
        y = _inorm(f"{name}_res{i}_norm_b")(y)
        x = layers.Add(name=f"{name}_res{i}_add")([x, y])
    for i, mult in enumerate((2, 1)):
        x = layers.Conv2DTranspose(f * mult, 3, strides=2, padding="same", use_bias=False,
                                   kernel_initializer=_init(), name=f"{name}_up{i}")(x)
        x = layers.ReLU(name=f"{name}_up{i}_relu")(_inorm(f"{name}_up{i}_norm")(x))
    x = pad(3, name=f"{name}_pad_out")(x)
    x = layers.Conv2D(3, 7, padding="valid", kernel_initializer=_init(), name=f"{name}_c7_out")(x)
    out = layers.Activation("tanh", dtype="float32", name=f"{name}_tanh")(x)
    return keras.Model(inp, out, name=name)


def build_discriminator(image_size: int, base_filters: int = 64, n_downsamples: int | None = None,
                        name: str = "discriminator") -> Any:
    """PatchGAN C f-2f-4f-8f (4x4, stride 2; no norm on the first), then stride-1 8f and a 1-channel patch map."""
    import keras
    from keras import layers

    n = patchgan_downsamples(image_size) if n_downsamples is None else n_downsamples
    if n < 1 or image_size // 2**n < 1:
        raise InputError(f"discriminator: {n} downsamples do not fit a {image_size} px image")
    f = base_filters
    inp = keras.Input((image_size, image_size, 3), name=f"{name}_image")
    x = inp
    for i in range(n):
        x = layers.Conv2D(f * min(2**i, 8), 4, strides=2, padding="same", use_bias=i == 0,
                          kernel_initializer=_init(), name=f"{name}_down{i}")(x)
        if i > 0:
            x = _inorm(f"{name}_down{i}_norm")(x)
        x = layers.LeakyReLU(0.2, name=f"{name}_down{i}_lrelu")(x)
    x = layers.Conv2D(f * min(2**n, 8), 4, padding="same", use_bias=False, kernel_initializer=_init(),
                      name=f"{name}_conv")(x)
    x = layers.LeakyReLU(0.2, name=f"{name}_conv_lrelu")(_inorm(f"{name}_conv_norm")(x))
    out = layers.Conv2D(1, 4, padding="same", kernel_initializer=_init(), dtype="float32", name=f"{name}_patch")(x)
    return keras.Model(inp, out, name=name)


def load_generator(path: str | Path) -> Any:
    """Load a saved generator (.keras) with its custom layer."""
    import keras

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `lesionflow stage cyclegan` (or `dvc repro cyclegan`) first")
    return keras.saving.load_model(path, custom_objects=custom_objects(), compile=False)


# --------------------------------------------------------------------------- the trainer
@dataclass(frozen=True)
class GanConfig:
    """Architecture and optimisation knobs of one CycleGAN (a plain record; tasks/cyclegan.py fills it from params)."""

    image_size: int = 32
    base_filters: int = 16
    n_res_blocks: int = 2
    disc_filters: int = 16
    disc_downsamples: int | None = None
    lr: float = 2e-4
    beta_1: float = 0.5
    cycle_weight: float = 10.0
    identity_weight: float = 5.0
    pool_size: int = 50
    batch_size: int = 1


LOSS_NAMES = ("d_a", "d_b", "g_ab", "g_ba", "cycle_a", "cycle_b", "identity_a", "identity_b", "g_total")


class CycleGan:
    """Two generators (A->B, B->A), two discriminators, their optimisers and the image history pools.

    Domain A = benign, B = malignant. All state lives in tf.Variables reachable from `checkpoint()`, so a resumed run
    continues exactly where it stopped (pool contents and optimiser moments included).
    """

    def __init__(self, cfg: GanConfig) -> None:
        import keras
        import tensorflow as tf

        self.cfg = cfg
        s = cfg.image_size
        self.g_ab = build_generator(s, cfg.base_filters, cfg.n_res_blocks, name="g_ab")
        self.g_ba = build_generator(s, cfg.base_filters, cfg.n_res_blocks, name="g_ba")
        self.d_a = build_discriminator(s, cfg.disc_filters, cfg.disc_downsamples, name="d_a")
        self.d_b = build_discriminator(s, cfg.disc_filters, cfg.disc_downsamples, name="d_b")
        self.g_opt = keras.optimizers.Adam(cfg.lr, beta_1=cfg.beta_1, beta_2=0.999, name="g_opt")
        self.d_opt = keras.optimizers.Adam(cfg.lr, beta_1=cfg.beta_1, beta_2=0.999, name="d_opt")
        self.g_vars = self.g_ab.trainable_variables + self.g_ba.trainable_variables
        self.d_vars = self.d_a.trainable_variables + self.d_b.trainable_variables
        # Build optimiser slots now: a restore then finds every variable it has to fill.
        self.g_opt.build(self.g_vars)
        self.d_opt.build(self.d_vars)
        pool = max(cfg.pool_size, 1)
        # The pools live on the CPU: a few small copies per step, and their scatter/gather never meet a GPU kernel
        # without a deterministic implementation.
        with tf.device("/CPU:0"):
            self.pool_a = tf.Variable(tf.zeros((pool, s, s, 3)), trainable=False, name="pool_a")
            self.pool_b = tf.Variable(tf.zeros((pool, s, s, 3)), trainable=False, name="pool_b")
            self.pool_a_count = tf.Variable(0, dtype=tf.int32, trainable=False, name="pool_a_count")
            self.pool_b_count = tf.Variable(0, dtype=tf.int32, trainable=False, name="pool_b_count")
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self._train_step = tf.function(self._step_impl, reduce_retracing=True)

    def checkpoint(self) -> Any:
        """A tf.train.Checkpoint of every piece of training state."""
        import tensorflow as tf

        return tf.train.Checkpoint(
            g_ab=self.g_ab, g_ba=self.g_ba, d_a=self.d_a, d_b=self.d_b, g_opt=self.g_opt, d_opt=self.d_opt,
            pool_a=self.pool_a, pool_b=self.pool_b, pool_a_count=self.pool_a_count,
            pool_b_count=self.pool_b_count, step=self.step,
        )

    def _query_pool(self, pool: Any, count: Any, fakes: Any, coins: Any, slots: Any) -> Any:
        """History pool (Shrivastava et al.): fill it first, then for each image with coin > 0.5 return an old fake
        and store the new one in its slot. Vectorised (no Python loop to trace): while filling, images that no
        longer fit pass through; `slots` are distinct within a batch (see pool_query_plan) so writes never collide."""
        import tensorflow as tf

        if self.cfg.pool_size <= 0:
            return fakes
        with tf.device("/CPU:0"):
            return self._query_pool_cpu(pool, count, fakes, coins, slots)

    @staticmethod
    def _query_pool_cpu(pool: Any, count: Any, fakes: Any, coins: Any, slots: Any) -> Any:
        import tensorflow as tf

        size = tf.shape(pool)[0]
        n = tf.shape(fakes)[0]
        full = count >= size
        fill_idx = count + tf.range(n)
        swap = tf.logical_and(full, coins > 0.5)
        out = tf.where(swap[:, None, None, None], tf.gather(pool, slots), fakes)
        write = tf.where(full, swap, fill_idx < size)
        where = tf.where(full, slots, fill_idx)
        pool.scatter_nd_update(tf.boolean_mask(where, write)[:, None], tf.boolean_mask(fakes, write))
        count.assign(tf.minimum(count + n, size))
        return out

    def _step_impl(self, real_a: Any, real_b: Any, coins_a: Any, slots_a: Any, coins_b: Any, slots_b: Any) -> dict:
        import tensorflow as tf

        cfg = self.cfg
        mse = lambda x, target: tf.reduce_mean(tf.square(x - target))  # noqa: E731  (least-squares GAN)
        l1 = lambda x, y: tf.reduce_mean(tf.abs(x - y))  # noqa: E731
        with tf.GradientTape() as tape:
            fake_b = self.g_ab(real_a, training=True)
            fake_a = self.g_ba(real_b, training=True)
            rec_a = self.g_ba(fake_b, training=True)
            rec_b = self.g_ab(fake_a, training=True)
            g_ab = mse(self.d_b(fake_b, training=True), 1.0)
            g_ba = mse(self.d_a(fake_a, training=True), 1.0)
            cycle_a, cycle_b = l1(rec_a, real_a), l1(rec_b, real_b)
            if cfg.identity_weight > 0:
                identity_a = l1(self.g_ba(real_a, training=True), real_a)
                identity_b = l1(self.g_ab(real_b, training=True), real_b)
            else:
                identity_a = identity_b = tf.constant(0.0)
            g_total = (g_ab + g_ba + cfg.cycle_weight * (cycle_a + cycle_b)
                       + cfg.identity_weight * (identity_a + identity_b))
        self.g_opt.apply_gradients(zip(tape.gradient(g_total, self.g_vars), self.g_vars))

        # Discriminators see pooled fakes (older generator outputs too), which damps oscillation.
        pooled_b = self._query_pool(self.pool_b, self.pool_b_count, tf.stop_gradient(fake_b), coins_b, slots_b)
        pooled_a = self._query_pool(self.pool_a, self.pool_a_count, tf.stop_gradient(fake_a), coins_a, slots_a)
        with tf.GradientTape() as tape:
            d_a = 0.5 * (mse(self.d_a(real_a, training=True), 1.0) + mse(self.d_a(pooled_a, training=True), 0.0))
            d_b = 0.5 * (mse(self.d_b(real_b, training=True), 1.0) + mse(self.d_b(pooled_b, training=True), 0.0))
            d_total = d_a + d_b
        self.d_opt.apply_gradients(zip(tape.gradient(d_total, self.d_vars), self.d_vars))
        self.step.assign_add(1)
        return {"d_a": d_a, "d_b": d_b, "g_ab": g_ab, "g_ba": g_ba, "cycle_a": cycle_a, "cycle_b": cycle_b,
                "identity_a": identity_a, "identity_b": identity_b, "g_total": g_total}

    def train_step(self, real_a: np.ndarray, real_b: np.ndarray, lr: float,
                   pool_plan_a: tuple[np.ndarray, np.ndarray], pool_plan_b: tuple[np.ndarray, np.ndarray]) -> dict:
        """One generator + discriminator update on a batch of each domain ([-1, 1] float32); returns float losses."""
        import tensorflow as tf

        self.g_opt.learning_rate = lr
        self.d_opt.learning_rate = lr
        losses = self._train_step(
            tf.convert_to_tensor(real_a, tf.float32), tf.convert_to_tensor(real_b, tf.float32),
            tf.convert_to_tensor(pool_plan_a[0]), tf.convert_to_tensor(pool_plan_a[1]),
            tf.convert_to_tensor(pool_plan_b[0]), tf.convert_to_tensor(pool_plan_b[1]),
        )
        return {k: float(v) for k, v in losses.items()}

    def translate(self, images: np.ndarray, direction: str = "ab", batch_size: int = 32) -> np.ndarray:
        """Apply G_AB ("ab": benign->malignant) or G_BA ("ba") to [-1, 1] images, in batches."""
        model = {"ab": self.g_ab, "ba": self.g_ba}[direction]
        return translate(model, images, batch_size)


def translate(generator: Any, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Run a generator over [-1, 1] float images in batches (inference mode), returning [-1, 1] float32."""
    outs = [np.asarray(generator(images[i:i + batch_size], training=False))
            for i in range(0, len(images), batch_size)]
    if not outs:
        return np.zeros((0, *images.shape[1:]), np.float32)
    return np.concatenate(outs).astype(np.float32)
