"""The words of the shapes benchmark, in the order that fixes their token ids in the tiny tokenizers.

A word's id decides which row of the tiny LM's and Q-Former's randomly initialised embedding it gets, so a
vocabulary ordered by how often each word occurs (as it once was) gave every word another id, and every stage of
the demo another draw, whenever a change to the data moved one word's count. This list is that order frozen:
the words of the seed-0 data at the default sizes (generator version 3) and the instruction templates, most
frequent first, ties by spelling. The same data therefore gets the same ids as before the list existed, and
another seed, size or question only adds words (after these, see ``build_vocabulary``). Append new words at the
end; never reorder or remove one.
"""

# whitespace-separated; punctuation marks are words of their own (WORD_PATTERN in ibkit.shapes.datamodule)
_WORDS_IN_ORDER = """
a the small large . triangle square star circle green orange left ? purple right yellow blue red is : at on , no
yes and 1 bottom top what of answer or there question short shape picture color an shapes in are middle how
object many ( ) 2 image to q false true exists size side " 3 options dialog 4 count three this true_false
qa_size caption color_present qa_count qa_shape background plain single b c d qa_exists qa_color based qa_side
two statement four 0 with following as description history corners use provide given one possible words using
can stars provided your has answered be below squares above more than circles triangles respond any up written
cool colors down warm have moving 10 about word which direction photo reply does conversation answers you option
for correct briefly earlier rounds - here choice look whether by { } claim choose write describe from few [ ]
text keeping mind it 5 last chat follow support previous leaf questions against answering continue far pen shoe
so verify choices next now scene rose account decide multiple tell best matches language arranged examine
objects bird picking according road that these select ball content shows bell cup tree could key considering
perceive presented milk happening illustrate lamp depiction explain fish moon please see frog cat sun rain car
bus map kite box door ship dog context hat 6 book coin ocr tokens meme hateful video into user assistant
contains detected found generate give including read reads recognized response says sentence taking visible
writing appears attack attention because both clip come convey craft create dialogue frames happens hate helpful
hint human important instruction its labels leads mentioning other out paying people reading representation
request say show shown signs takes they together turns visual watch watching where who whose would
"""
SHAPES_WORDS: tuple[str, ...] = tuple(_WORDS_IN_ORDER.split())
