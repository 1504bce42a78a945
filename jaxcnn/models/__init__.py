"""Model families; importing this package registers every model."""
from . import pyramidnet, resnet  # noqa: F401
from . import revnet  # noqa: F401
from . import nfnet  # noqa: F401
from . import alexnet, lenet, nin, vgg  # noqa: F401
