"""The names the generator draws from: colours, shapes, sizes, grid cells and words.

Colours are far apart in hue or lightness so each name is unambiguous; white is the
background, so it is not an object colour. Positions are the nine cells of a 3x3 grid
over the canvas, named in row-major order.
"""

COLOURS = {  # name -> RGB
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 205, 20),
    "purple": (130, 50, 170),
    "orange": (250, 130, 20),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "pink": (245, 130, 190),
    "brown": (125, 75, 30),
    "cyan": (40, 200, 220),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "heart")
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
SIZES = ("small", "large")

# (colour, shape) pairs that train/validation/test never draw, nor mention in a
# question; the `heldout` split draws only scenes holding at least one of them.
# Each shape and each of eight colours occurs once, so every colour and every shape
# is still seen in training, only never in these combinations.
HELDOUT_PAIRS = (
    ("red", "star"), ("green", "heart"), ("blue", "triangle"), ("yellow", "circle"),
    ("purple", "square"), ("orange", "hexagon"), ("cyan", "diamond"), ("pink", "cross"),
)
ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)

# Cell index = row * 3 + col. Names are the answers to "where is ...?"; phrases go in sentences.
CELL_NAMES = ("top left", "top", "top right", "left", "center", "right",
              "bottom left", "bottom", "bottom right")
CELL_PHRASES = ("in the top left", "at the top", "in the top right", "on the left", "in the center",
                "on the right", "in the bottom left", "at the bottom", "in the bottom right")

# OCR: dark text colours that read well on the light backgrounds below.
TEXT_COLOURS = ("black", "red", "green", "blue", "purple", "brown")
TEXT_BACKGROUNDS = {  # name -> RGB
    "white": (255, 255, 255),
    "cream": (252, 244, 214),
    "light blue": (222, 236, 252),
    "light gray": (232, 232, 232),
}
WORDS = (
    "OPEN", "STOP", "EXIT", "SALE", "PUSH", "PULL", "CAFE", "HOTEL", "TAXI", "BANK", "PARK", "SHOP",
    "BOOK", "MILK", "BREAD", "FOOD", "WEST", "EAST", "NORTH", "SOUTH", "LEFT", "RIGHT", "ENTER",
    "CLOSED", "FREE", "HELP", "INFO", "GATE", "DOOR", "ROOM", "HALL", "BUS", "TRAIN", "PLANE",
    "SHIP", "CITY", "TOWN", "ROAD", "LANE", "BRIDGE", "RIVER", "LAKE", "HILL", "FARM", "ZOO",
    "MUSEUM", "CINEMA", "MUSIC", "RADIO", "PHONE", "EMAIL", "LOGIN", "START", "PAUSE", "PLAY",
    "RESET", "SAVE", "LOAD", "MENU", "HOME", "BACK", "NEXT", "DONE", "READY", "WAIT", "SLOW",
    "FAST", "YIELD", "DANGER", "SAFE", "QUIET", "LOUD", "HOT", "COLD", "WARM", "FRESH", "SALT",
    "SUGAR", "TEA", "COFFEE", "JUICE", "WATER", "FIRE", "POLICE", "TICKET", "PRICE", "CASH",
    "CARD", "GIFT", "TOYS", "GAMES", "SPORT", "GOLF", "POOL", "GYM", "YOGA", "DANCE", "ART",
    "LAB", "DESK", "LAMP", "CHAIR", "TABLE", "CLOCK", "PAPER", "PEN", "INK", "MAP", "KEY", "LOCK",
    "BOX", "BAG", "CUP", "HAT", "SHOE", "COAT", "KING", "QUEEN", "MOON", "STAR", "SUN", "RAIN",
    "SNOW", "WIND", "STORM", "CLOUD", "APPLE", "LEMON", "MANGO", "GRAPE", "PEACH", "PIZZA",
)

# Documents: a title, two or three (item, value) rows and a TOTAL row.
DOC_TITLES = ("MENU", "BILL", "ORDER", "SCORES", "STOCK", "PRICES", "SALES", "COSTS", "BUDGET",
              "TALLY", "VOTES", "POINTS", "CART", "LIST", "RECEIPT", "INVOICE")
DOC_ITEMS = ("TEA", "CAKE", "SOUP", "MILK", "RICE", "FISH", "BREAD", "JAM", "EGGS", "SALT", "PEN",
             "INK", "MAP", "BOX", "CUP", "HAT", "BAG", "SOAP", "LAMP", "ROPE", "NAILS", "GLUE",
             "TAPE", "WINE", "JUICE", "PIE", "TACO", "BEANS", "CORN", "OIL", "NUTS", "PLUMS")
