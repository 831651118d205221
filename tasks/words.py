"""Embedded English word lists and deterministic word samplers.

RULER (Hsieh et al., 2024, arXiv 2404.06654) draws needle keys ("adjective-noun") and the common-words-extraction
vocabulary (nouns + adjectives + verbs) from the ``wonderwords`` package. To stay offline and dependency-free, this
module embeds about a thousand common English words instead; when a task needs more distinct words than that (CWE
beyond ~32k tokens), two-noun compounds ("applegarden") are added deterministically.
"""

from __future__ import annotations

import random
import uuid
from functools import lru_cache

_NOUNS_TEXT = """
    account acid actor address advice afternoon agency airport alarm album alley anchor angle animal ankle answer
    apple apron arch area arm army arrow artist ash attic aunt avenue baby badge bag bakery balcony ball balloon
    banana band bank barn barrel basket bath battery beach beam bean bear beard bed bee beetle bell belt bench berry
    bicycle bird biscuit blanket blade block blossom board boat body bolt bone book boot border bottle bowl box
    bracelet brain branch bread brick bridge brother brush bucket budget buffalo building bull bus bush butter button
    cabin cable cactus cake camel camera camp canal candle canoe canvas canyon cap captain car card carpet carrot cart
    castle cat cattle cave ceiling cellar chain chair chalk channel chapter cheese cherry chest chicken child chimney
    church circle city clock cloud clover coach coal coast coat coffee coin collar comet compass copper corn corner
    cottage cotton council country cousin cow crab crane crayon cream creek crew cricket crow crown cup curtain
    cushion dance daughter deer desert desk diamond dinner doctor dog doll dolphin donkey door dragon drawer dream
    dress drum duck eagle ear earth eel egg elbow elephant engine envelope eye fabric face factory falcon family farm
    father feather fence ferry field finger fire fish flag flame flower flute fog folder forest fork fountain fox
    frame friend frog fruit furnace galaxy garage garden garlic gate gem giraffe glacier glass glove goat gold grape
    grass gravel guitar hammer hand harbor harp hat hawk heart hedge helmet hill hive honey hook horn horse hospital
    hotel house island jacket jar jelly jewel judge kettle key kitchen kite kitten knee knife ladder lake lamp lantern
    leaf lemon letter library lighthouse lily lion lizard lobster lock locket machine magnet mailbox map maple marble
    market mask meadow melon mirror monkey moon moose mosquito mountain mouse muffin museum needle nest net newspaper
    night noodle notebook nurse oak ocean office olive onion orange orchard otter oven owl painter palace pan panda
    paper parrot path peach peanut pear pebble pencil penguin pepper piano picture pie pig pillow pilot pine pipe
    planet plate pocket poet pond potato puppy purse puzzle quilt rabbit radio railway rain rainbow raven river road
    robin rocket roof room rope rose saddle sailor salad salmon sandal school scissors sea seed shadow shark sheep
    shelf shell ship shirt shoe shovel singer sister skirt sky snail snake soap sock sofa soldier spider spoon
    squirrel stable stadium stamp star station statue stone storm stove stream street sugar suitcase summer sun swan
    sweater table tail teacher teapot temple tent theater thread thunder ticket tiger tomato tooth tower town toy
    tractor train tree truck trumpet tulip tunnel turtle umbrella uncle valley vase village violin volcano wagon
    wallet walrus wardrobe watch water wave whale wheel whistle window wing winter wizard wolf worm yacht yard zebra
    """
NOUNS = tuple(_NOUNS_TEXT.split())

_ADJECTIVES_TEXT = """
    able absent active adorable afraid agile alert alive amazing ancient angry anxious aromatic ashamed awake awful
    bad bashful beautiful bewildered big bitter black bland blue bold boring brave brief bright brilliant broad broken
    brown bumpy busy calm careful cheap cheerful chilly clean clever cloudy clumsy cold colossal comfortable common
    cool courageous crazy creamy creepy crisp crooked crowded cruel cuddly curious curly cute damp dark dazzling dear
    deep defiant delicate delightful dense dirty dizzy dry dull dusty eager early easy elegant empty enchanting
    energetic enormous envious even evil excited expensive faint fair faithful famous fancy fast fat fearless fierce
    filthy fine flat fluffy foolish fragile frail frantic fresh friendly frightened funny fuzzy gentle giant gifted
    glad gleaming glorious golden good gorgeous graceful grateful great greedy green grumpy handsome happy hard harsh
    healthy heavy helpful helpless hidden high hollow homely honest huge humble hungry icy idle important innocent
    itchy jealous jolly joyous juicy kind large late lazy light little lively lonely long loud lovely lucky magnetic
    massive mellow merry mighty misty modern modest muddy mysterious narrow nasty naughty neat nervous new nice noisy
    obedient odd old orange pale perfect plain plastic pleasant polite poor powerful precious pretty proud purple
    quick quiet quirky rapid rare raspy red rich ripe rotten rough round royal rusty sad safe salty scary selfish
    shaggy shallow sharp shiny short shy silent silly silver simple sleepy slim slippery slow small smooth soft solid
    sour sparkling spicy splendid spotless square stale steep sticky stormy strange strong stubborn sturdy subtle
    sunny super sweet swift tall tame tasty tender tense terrible thankful thick thin thirsty thoughtful tidy tiny
    tired tough tricky ugly uneven upset vast victorious vivid warm wary weak wealthy weary wet white wicked wide wild
    windy wise witty wooden worried yellow young zany zealous
    """
ADJECTIVES = tuple(_ADJECTIVES_TEXT.split())

_VERBS_TEXT = """
    accept add admire agree allow answer appear arrange arrive ask attack bake balance bathe beg behave belong bless
    blink boil borrow bounce breathe bring brush build burn bury calculate call carry catch celebrate change chase
    cheer chew choose clap clean climb close collect comb compare complain cook copy count cover crawl cross cry cycle
    dance decide deliver describe design destroy dig discover dive drag draw dream drink drive drop dust earn eat
    enjoy enter escape examine explain explore fetch fill find fix float fly fold follow forgive gather gaze giggle
    glow grab greet grow guard guess hammer handle hang happen help hide hike hold hop hug hunt hurry imagine improve
    invent invite jog join juggle jump kick kneel knit knock laugh launch lead learn lend lift listen live march marry
    measure melt mend mix move nod obey offer open order paddle paint pack paste pause peel perform pick plant play
    pour pray print promise protect pull punch push question race rain reach read relax remember repair repeat reply
    rescue rest return ride ring roar roll row rush sail scatter scream search sew shake share shine shiver shout sing
    sink sit sketch skip sleep slide smile sneeze snore solve sort speak spell spin splash spray squeeze stack stare
    start steer stir stretch study swim swing talk taste teach tease thank throw tickle travel trust try tug turn
    twist type unlock unpack vanish visit wait walk wander wash watch wave weave whisper whistle win wink wish wonder
    work worry wrap write yawn yell zoom
    """
VERBS = tuple(_VERBS_TEXT.split())


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """All embedded words (nouns, adjectives, verbs), sorted and unique, like RULER's CWE word list."""
    return tuple(sorted(set(NOUNS) | set(ADJECTIVES) | set(VERBS)))


def random_key(rng: random.Random) -> str:
    """An ``adjective-noun`` pair, RULER's ``words`` needle type (e.g. ``"curious-lantern"``)."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def random_number(rng: random.Random, num_digits: int = 7) -> str:
    """A random ``num_digits``-digit number without leading zero, RULER's ``numbers`` needle type."""
    return str(rng.randint(10 ** (num_digits - 1), 10**num_digits - 1))


def random_uuid(rng: random.Random) -> str:
    """A random version-4 UUID string, RULER's ``uuids`` needle type."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_value(rng: random.Random, kind: str) -> str:
    """Draw a needle key or value of RULER type ``kind`` (``"words"``, ``"numbers"`` or ``"uuids"``)."""
    if kind == "words":
        return random_key(rng)
    if kind == "numbers":
        return random_number(rng)
    if kind == "uuids":
        return random_uuid(rng)
    raise ValueError(f"unknown needle type {kind!r}; choose from: words, numbers, uuids")


def sample_words(rng: random.Random, k: int) -> list[str]:
    """``k`` distinct words in random order.

    Parameters
    ----------
    rng : random.Random
        Source of randomness.
    k : int
        Number of words. Up to ``len(vocabulary())`` they are embedded words; beyond, two-noun compounds are added.

    Returns
    -------
    list of str
        Distinct lowercase words.
    """
    vocab = vocabulary()
    if k <= len(vocab):
        return rng.sample(vocab, k)
    words = list(vocab)
    seen = set(words)
    while len(words) < k:
        first, second = rng.sample(NOUNS, 2)
        compound = first + second
        if compound not in seen:
            seen.add(compound)
            words.append(compound)
    rng.shuffle(words)
    return words
