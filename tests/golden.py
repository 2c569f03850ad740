"""Golden values: the tutorial's worked examples, as read-only float64 constants.

Shapes follow the tutorial (no batch axis): add one with ``x[None]`` for NCHW.
Import from a test module as ``import golden`` (pytest puts tests/ on sys.path).
"""

import numpy as np


def _const(values) -> np.ndarray:
    a = np.array(values, dtype=np.float64)
    a.setflags(write=False)  # shared by several test modules: nobody may edit them
    return a


# Convolution example (section 2.2.1): a 5x5x3 input, two 3x3x3 filters, stride 2, zero padding 1.
CONV_X = _const([  # (C=3, H=5, W=5)
    [[0, 1, 1, 0, 2], [2, 2, 2, 2, 1], [1, 0, 0, 2, 0], [0, 1, 1, 0, 0], [1, 2, 0, 0, 2]],
    [[1, 0, 2, 2, 0], [0, 0, 0, 2, 0], [1, 2, 1, 2, 1], [1, 0, 0, 0, 0], [1, 2, 1, 1, 1]],
    [[2, 1, 2, 0, 0], [1, 0, 0, 1, 0], [0, 2, 1, 0, 1], [0, 1, 2, 2, 2], [2, 1, 0, 0, 1]],
])
CONV_W = _const([  # (F=2, C=3, KH=3, KW=3)
    [[[-1, 1, 0], [0, 1, 0], [0, 1, 1]],
     [[-1, -1, 0], [0, 0, 0], [0, -1, 0]],
     [[0, 0, -1], [0, 1, 0], [1, -1, -1]]],
    [[[1, 1, -1], [-1, -1, 1], [0, -1, 1]],
     [[0, 1, 0], [-1, 0, -1], [-1, 1, 0]],
     [[-1, 0, 0], [-1, 0, 1], [-1, 0, 0]]],
])
CONV_B = _const([1, 0])  # (F=2,)
CONV_STRIDE = 2
CONV_PADDING = 1
CONV_Y = _const([  # (F=2, OH=3, OW=3)
    [[6, 7, 5], [3, -1, -1], [2, -1, 4]],
    [[2, -5, -8], [1, -4, -4], [0, -5, -5]],
])

# Pooling example (section 2.2.2): 2x2 max pooling, stride 2, on a 4x4 input of depth 2.
POOL_X = _const([  # (C=2, H=4, W=4)
    [[1, 1, 2, 4], [5, 6, 7, 8], [3, 2, 1, 0], [1, 2, 3, 4]],
    [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [3, 4, 5, 6]],
])
POOL_KERNEL = 2
POOL_STRIDE = 2
MAX_POOL_Y = _const([  # (C=2, 2, 2)
    [[6, 8], [3, 4]],
    [[5, 7], [9, 6]],
])
AVG_POOL_Y = _const([  # mean pooling of POOL_X, same windows
    [[3.25, 5.25], [2, 2]],
    [[2.5, 4.5], [6, 3]],
])
# Max pooling backward (section 3.2.1): each error goes to its window's maximum, the rest get 0.
MAX_POOL_DY = _const([
    [[1, 2], [3, 4]],
    [[5, 6], [7, 8]],
])
MAX_POOL_DX = _const([
    [[0, 0, 0, 0], [0, 1, 0, 2], [3, 0, 0, 0], [0, 0, 0, 4]],
    [[0, 0, 0, 0], [0, 5, 0, 6], [0, 7, 0, 0], [0, 0, 0, 8]],
])
# Mean pooling backward (section 3.2.2): each error is shared equally by its 2x2 block.
AVG_POOL_DX = _const([
    [[0.25, 0.25, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 1, 1], [0.75, 0.75, 1, 1]],
    [[1.25, 1.25, 1.5, 1.5], [1.25, 1.25, 1.5, 1.5], [1.75, 1.75, 2, 2], [1.75, 1.75, 2, 2]],
])
