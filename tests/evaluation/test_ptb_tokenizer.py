"""Tests of the Python PTB normalisation against outputs of pycocoevalcap's Java tokenizer.

The expected strings below were produced by `PTBTokenizer().tokenize` of pycocoevalcap 1.2 (CoreNLP 3.4.1);
`test_matches_java_on_caption_corpus` reruns the jar itself when Java and pycocoevalcap are present.
"""

import pytest

from qwenvl_jax.evaluation import ptb_tokenizer

JAVA_OUTPUTS = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("Two dogs (one black) play in the snow!", "two dogs -lrb- one black -rrb- play in the snow"),
    ('"Hello," she said; it\'s a dog\'s life...', "hello she said it 's a dog 's life"),
    ("A black-and-white photo of Mr. Smith's car in the U.S.",
     "a black-and-white photo of mr. smith 's car in the u.s."),
    ("He doesn't know, can't go, won't stop. I'm here, you're there; they've gone, we'll see, she'd say.",
     "he does n't know ca n't go wo n't stop i 'm here you 're there they 've gone we 'll see she 'd say"),
    ("The price is $3.50 or 1,000 yen -- 50% off & more.", "the price is $ 3.50 or 1,000 yen 50 % off & more"),
    ("A cat/dog on a [red] {blue} couch: nice?", "a cat/dog on a -lsb- red -rsb- -lcb- blue -rcb- couch nice"),
    ("Cannot believe it's 3:30 p.m. already", "can not believe it 's 3:30 p.m. already"),
    ("A t-shirt that says 'hi' and ``quoted'' text", "a t-shirt that says hi and quoted text"),
    ("Gonna wanna gotta lemme", "gon na wan na got ta lem me"),
    ("A man's hat and the boys' hats", "a man 's hat and the boys hats"),
    ("What?!", "what ?!"),
    ("Wow!! Really?? ok!?", "wow !! really ?? ok !?"),
    ("It costs 5$ and 10%.", "it costs 5 $ and 10 %"),
    ("St. Louis and Dr. Who vs. Mr Bean etc.", "st. louis and dr. who vs. mr bean etc."),
    ("No. 5 and Fig. 3", "no. 5 and fig. 3"),
    ("the answer is no.", "the answer is no"),
    ("hello- -hello a -- b - c", "hello hello a b c"),
    ("(1,2),(3,4)", "-lrb- 1,2 -rrb- -lrb- 3,4 -rrb-"),
    ("it\u2019s a dog\u2019s \u201cfavorite\u201d toy\u2026", "it 's a dog 's favorite toy"),
    ("a man \u2013 with a hat \u2014 walks", "a man with a hat walks"),
    ("The dog is #1 in the world", "the dog is # 1 in the world"),
    ("at&t store and a man w/ a hat", "at & t store and a man w / a hat"),
    ("the '80s and 90's", "the '80s and 90 's"),
    ("e-mail me at foo@bar.com or visit www.example.com", "e-mail me at foo@bar.com or visit www.example.com"),
    ("A person.With no space", "a person.with no space"),
    ("Caf\u00e9 na\u00efve r\u00e9sum\u00e9", "caf\u00e9 na\u00efve r\u00e9sum\u00e9"),
    ("**MME (Qwen-VL-Chat)**", "** mme -lrb- qwen-vl-chat -rrb- **"),
    ("---", ""),
    ("### 3.3 Training recipe [P]", "### 3.3 training recipe -lsb- p -rsb-"),
    ("- ViT: OpenCLIP ViT-bigG/14, 1.9B parameters, patch stride 14.",
     "vit openclip vit-bigg/14 1.9 b parameters patch stride 14"),
]

# Caption-like sentences for the live comparison with the jar (annotator and model styles).
CORPUS = [text for text, _ in JAVA_OUTPUTS] + [
    "a tennis player swinging a racket at a ball .",
    "A LARGE GROUP OF PEOPLE STANDING AROUND .",
    "Two people are sitting on a bench, watching the sunset.",
    "A kitchen with stainless steel appliances and granite counter tops",
    "There's a sign that reads \"STOP\" on the corner.",
    "a man in a red shirt is riding a bike down the street",
    "A young girl, wearing a pink dress, is jumping on the bed.",
    "Three men (two in suits) stand near a 4-door car.",
    "A plate of food: rice, beans and chicken.",
    "The woman's umbrella is open; it's raining.",
    "An old man with a cane walks his dog in the park at 7 a.m.",
    "a group of kids playing soccer on a field.",
    "A dog catches a frisbee in mid-air!",
    "Is this a cat? No, it's a dog.",
    "a close up of a pizza with pepperoni and cheese",
    "Someone's hand holding a smartphone showing the time 12:45.",
    "A crowd watches fireworks over the city... beautiful!",
    "The sign says 'No Parking' in red letters.",
    "two giraffes standing next to each other in a zoo enclosure .",
    "A man and a woman pose for a picture at their wedding",
    "A bowl of soup, a sandwich, and a glass of water on a wooden table.",
    "Baseball player #23 swings at the pitch",
    "A surfer rides a 10-foot wave at Mavericks, California.",
    "Children's toys are scattered across the floor",
    "The bus is heading to downtown via 5th Ave.",
    "a black and white photo of an old train station",
    "A herd of sheep grazing on a green hillside",
    "a woman is cutting a cake with a knife",
    "A computer desk with two monitors, a keyboard and a mouse",
    "Describe: a cat sleeping on a laptop keyboard",
]


def test_known_java_outputs():
  texts = [text for text, _ in JAVA_OUTPUTS]
  assert ptb_tokenizer.tokenize(texts) == [expected for _, expected in JAVA_OUTPUTS]


def test_newlines_become_spaces():
  assert ptb_tokenizer.tokenize(["a dog\nrunning."]) == ["a dog running"]


@pytest.mark.parity
def test_matches_java_on_caption_corpus(java_ptb_tokenize):
  assert ptb_tokenizer.tokenize(CORPUS) == java_ptb_tokenize(CORPUS)
