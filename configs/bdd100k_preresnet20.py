# PreResNet-20 (ResNet v2, pre-activation bottlenecks) without downsampling (Table 3: 0.57 M, 77.86 / 52.12).
_base_ = ['./bdd100k_resnet44.py']
model = dict(backbone=dict(model_name='preresnet20_cifar'), decode_head=dict(in_channels=256, channels=256))
