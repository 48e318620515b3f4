"""The original notebook's Keras recipe, timed: one epoch of the dropout MLP on the benchmark's noisy images.

Run by ``study_speed.py`` in a child process with any Python that has TensorFlow (``--keras_python``),
so TensorFlow and torch never share a process or its threads:

    python benchmarks/keras_epoch.py IMAGES.npy LABELS.npy EPOCHS
Prints the seconds of each epoch after the first (which builds the graph), one per line.
"""

import sys
import time

import numpy as np
import tensorflow as tf


class EpochSeconds(tf.keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if epoch:  # the first epoch traces and compiles the step
            print(time.perf_counter() - self.start, flush=True)


def main() -> None:
    images, labels, epochs = np.load(sys.argv[1]), np.load(sys.argv[2]), int(sys.argv[3])
    model = tf.keras.Sequential(
        [
            tf.keras.Input((784,)),
            tf.keras.layers.Dense(512, activation="relu"),
            tf.keras.layers.Dropout(0.2),
            tf.keras.layers.Dense(512, activation="relu"),
            tf.keras.layers.Dropout(0.2),
            tf.keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        loss="sparse_categorical_crossentropy",
        optimizer=tf.keras.optimizers.RMSprop(learning_rate=1e-3, rho=0.9, epsilon=1e-7),
        metrics=["accuracy"],
    )
    model.fit(
        images.reshape(len(images), 784),
        labels,
        batch_size=128,
        epochs=epochs + 1,
        verbose=0,
        callbacks=[EpochSeconds()],
    )


if __name__ == "__main__":
    main()
