# As bdd100k_pide_diffusion.py, but the ignore label 255 is trained as a 20th class like the authors' code.
_base_ = ['./bdd100k_pide_diffusion.py']
train_dataloader = dict(dataset=dict(void_as_class=True))
val_dataloader = dict(dataset=dict(void_as_class=True))
test_dataloader = val_dataloader
model = dict(decode_head=dict(num_classes=20))
