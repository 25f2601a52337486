"""Stand-in for ``comfy.lora_convert``: the formats it converts (BFL control, Wan Fun...) are not used here."""


def convert_lora(sd):
    return sd
