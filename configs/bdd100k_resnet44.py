# ResNet-44 (ResNet v1, 16/32/64 channels) without downsampling (Table 3: 0.66 M, 83.50 / 63.42).
_base_ = ['./bdd100k_hamiltonian74.py']
model = dict(
    smoothness_weight=0.0,
    backbone=dict(
        _delete_=True,
        type='TIMMBackbone',
        model_name='resnet44_cifar',
        features_only=True,
        pretrained=False,
        downsample=False,
        out_indices=(2, )),
    decode_head=dict(in_channels=64, channels=64))
