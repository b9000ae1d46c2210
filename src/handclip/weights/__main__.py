"""``python -m handclip.weights``: print the demo backbone's path (for --pretrained)."""
from handclip.weights import DEMO_BACKBONE

print(DEMO_BACKBONE)
