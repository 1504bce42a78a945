"""Feature levels from the papers, for one model per family without a timm twin.

``PAPER_LEVELS[name]``: ``[(num_chs, reduction), ...]`` of ``jaxcnn.feature_info(name)`` at the
model's own input size (``jaxcnn.model_info(name).input_size``), finest first, read from the
paper's architecture table or figure (not from running the code). The levels follow timm's
convention: the stem's output (where the network has a stem), the output just before each
stride-2 / pooling step, and the end of the feature extractor (a pre-activation network's
last stage, before its final BN-ReLU). ``reduction`` is the input's side over the level's,
rounded to a power of two as ``feature_info`` rounds it (LeNet's 32 / 10 px -> 4).
"""

PAPER_LEVELS = {
    # He et al. 2016, Deep Residual Learning, §4.2 and Table 6: 3x3 stem of 16, stages of
    # 16 / 32 / 64 filters on 32 / 16 / 8 px maps (act1, layer1, layer2, layer3).
    'resnet20': [(16, 1), (16, 1), (32, 2), (64, 4)],
    # Zagoruyko & Komodakis 2016, Wide Residual Networks, Table 1 (k = 10): conv1 16 at 32 px,
    # conv2 16k at 32, conv3 32k at 16, conv4 64k at 8 (conv1, layer1, layer2, layer3).
    'wrn_28_10': [(16, 1), (160, 1), (320, 2), (640, 4)],
    # LeCun et al. 1998, Gradient-Based Learning, Fig. 2 / §II.B: C1 6@28x28, C3 16@10x10
    # (each before its subsampling layer), C5 120@1x1, on a 32x32 input.
    'lenet5': [(6, 1), (16, 4), (120, 32)],
    # Lin et al. 2014, Network In Network, §4.2 and Fig. 2 (three mlpconv layers, each but the
    # last followed by a stride-2 pool); widths from the authors' released CIFAR-10 model:
    # mlpconv1 192-160-96 at 32 px, mlpconv2 192-192-192 at 16, mlpconv3 192-192 at 8 (its last
    # 1x1 layer, 10 class maps, is the head).
    'nin_cifar': [(96, 1), (192, 2), (192, 4)],
    # Larsson et al. 2017, FractalNet, Table 1 / §3.3 and Fig. 1: five blocks of 64, 128, 256,
    # 512, 512 channels, each followed by a 2x2 max-pool (block1..block5 before their pools at
    # 32..2 px, then the last pool's 1x1 output).
    'fractalnet20': [(64, 1), (128, 2), (256, 4), (512, 8), (512, 16), (512, 32)],
    # Zhang et al. 2017, PolyNet, §3 (PolyInception modules keep their input's shape) with the
    # Inception-ResNet-v2 reductions (Szegedy et al. 2017, Fig. 7/18: max-pool beside strided
    # branches). No paper table covers this small CIFAR net; its layout is the module docstring
    # of jaxcnn/models/polynet.py: stem 64 at 32 px, stage A 64 at 32 (reduction A -> 128),
    # stage B 128 at 16 (reduction B -> 256), stage C then the final 1x1 conv, 256 at 8.
    'polynet_small_cifar': [(64, 1), (64, 1), (128, 2), (256, 4)],
    # Han et al. 2017, PyramidNet, Table 1 / eq. 2: conv1 16 at 32 px, then
    # D_k = floor(16 + alpha k / N) with N = 54 units, alpha = 48: 32 / 48 / 64 at the ends of
    # the 32 / 16 / 8 px groups.
    'pyramidnet110_a48': [(16, 1), (32, 1), (48, 2), (64, 4)],
    # Abdi & Nahavandi 2016, Multi-Residual Networks, CIFAR networks: the pre-activation
    # bottleneck layout of He et al. 2016b (Identity Mappings, ResNet-164): 3x3 stem of 16,
    # stages of 4 x (16, 32, 64) = 64 / 128 / 256 channels at 32 / 16 / 8 px.
    'multiresnet200_k5': [(16, 1), (64, 1), (128, 2), (256, 4)],
    # Gholami et al. 2018, SqueezeNext, §4 and Fig. 5 (1.0-SqNxt-23, 227 px): conv1 7x7/2 64 at
    # 111 px (before the max-pool), stages of 32 / 64 / 128 / 256 channels at 55 / 28 / 14 / 7;
    # stage 4 feeds only the final 1x1 conv of 128, the end of the extractor.
    'sqnxt23_w1': [(64, 2), (32, 4), (64, 8), (128, 16), (128, 32)],
    # Yang et al. 2019, CondConv (eq. 1-2: a CondConv layer keeps its conv's shape) on ResNet-20
    # of He et al. 2016, §4.2 / Table 6: stem 16, stages 16 / 32 / 64 at 32 / 16 / 8 px.
    'condconv_resnet20': [(16, 1), (16, 1), (32, 2), (64, 4)],
    # Jia, De Brabandere et al. 2016, Dynamic Filter Networks, §3.2 (dynamic convolution and
    # local filtering keep their input's shape), on this 3-stage net (no paper table; widths
    # 16 / 32 / 64 of jaxcnn/models/dynamic.py): stem 16 at 32 px, stages at 32 / 16 / 8 px.
    'dynconv_cifar': [(16, 1), (16, 1), (32, 2), (64, 4)],
    # Ha, Dai & Le 2016, HyperNetworks, §4.2 / Table 2 (WRN 40-2), the WRN of Zagoruyko &
    # Komodakis 2016, Table 1, k = 2: conv1 16 at 32 px, groups 32 / 64 / 128 at 32 / 16 / 8.
    'hyper_wrn40_2': [(16, 1), (32, 1), (64, 2), (128, 4)],
    # Gomez et al. 2017, The Reversible Residual Network, Table 1 (RevNet-38: channels
    # 32-32-64-112): stem 32 at 32 px, stages 32 / 64 / 112 at 32 / 16 / 8 (both halves).
    'revnet38': [(32, 1), (32, 1), (64, 2), (112, 4)],
    # Jacobsen et al. 2018, i-RevNet, §3 and Table 1 (i-RevNet (b), bijective; the authors'
    # release): initial 2x2 space-to-depth, stages 6-16-72-6 of F widths 24-96-384-1536, each
    # stage opening with a 2x2 space-to-depth; the representation is both halves, 2 x the
    # width: 48 at 56 px, 192 at 28, 768 at 14, 3072 at 7 (3072x7x7 = 3x224x224).
    'irevnet': [(48, 4), (192, 8), (768, 16), (3072, 32)],
    # Ronneberger et al. 2015, U-Net, Fig. 1 with widths / 8 (unet_small), padded convs, 64 px:
    # contracting levels 8 / 16 / 32 / 64 before each 2x2 max-pool, bottleneck 128 at 4 px.
    'unet_small': [(8, 1), (16, 2), (32, 4), (64, 8), (128, 16)],
    # Zhang et al. 2018, ShuffleNet, Table 1 (1x, g = 3): Conv1 24 at 112 px, MaxPool at 56,
    # Stage2 / 3 / 4 outputs 240 / 480 / 960 at 28 / 14 / 7.
    'shufflenet_g3': [(24, 2), (24, 4), (240, 8), (480, 16), (960, 32)],
}
