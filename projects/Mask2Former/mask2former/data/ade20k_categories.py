"""The 150 ADE20K (SceneParsing) categories as Mask2Former's ADE20K panoptic/instance
registration uses them: id (= semantic label, 0..149), whether it is a thing, name."""

_TABLE = """\
0 0 wall|1 0 building|2 0 sky|3 0 floor|4 0 tree|5 0 ceiling|6 0 road, route|7 1 bed|8 1 window
9 0 grass|10 1 cabinet|11 0 sidewalk, pavement|12 1 person|13 0 earth, ground|14 1 door|15 1 table
16 0 mountain, mount|17 0 plant|18 1 curtain|19 1 chair|20 1 car|21 0 water|22 1 painting, picture
23 1 sofa|24 1 shelf|25 0 house|26 0 sea|27 1 mirror|28 0 rug|29 0 field|30 1 armchair|31 1 seat
32 1 fence|33 1 desk|34 0 rock, stone|35 1 wardrobe, closet, press|36 1 lamp|37 1 tub|38 1 rail
39 1 cushion|40 0 base, pedestal, stand|41 1 box|42 1 column, pillar|43 1 signboard, sign
44 1 chest of drawers, chest, bureau, dresser|45 1 counter|46 0 sand|47 1 sink|48 0 skyscraper
49 1 fireplace|50 1 refrigerator, icebox|51 0 grandstand, covered stand|52 0 path|53 1 stairs
54 0 runway|55 1 case, display case, showcase, vitrine|56 1 pool table, billiard table, snooker table
57 1 pillow|58 1 screen door, screen|59 0 stairway, staircase|60 0 river|61 0 bridge, span
62 1 bookcase|63 0 blind, screen|64 1 coffee table
65 1 toilet, can, commode, crapper, pot, potty, stool, throne|66 1 flower|67 1 book|68 0 hill
69 1 bench|70 1 countertop|71 1 stove|72 1 palm, palm tree|73 1 kitchen island|74 1 computer
75 1 swivel chair|76 1 boat|77 0 bar|78 1 arcade machine|79 0 hovel, hut, hutch, shack, shanty
80 1 bus|81 1 towel|82 1 light|83 1 truck|84 0 tower|85 1 chandelier|86 1 awning, sunshade, sunblind
87 1 street lamp|88 1 booth|89 1 tv|90 1 plane|91 0 dirt track|92 1 clothes|93 1 pole
94 0 land, ground, soil|95 1 bannister, banister, balustrade, balusters, handrail
96 0 escalator, moving staircase, moving stairway|97 1 ottoman, pouf, pouffe, puff, hassock
98 1 bottle|99 0 buffet, counter, sideboard|100 0 poster, posting, placard, notice, bill, card
101 0 stage|102 1 van|103 1 ship|104 1 fountain
105 0 conveyer belt, conveyor belt, conveyer, conveyor, transporter|106 0 canopy
107 1 washer, automatic washer, washing machine|108 1 plaything, toy|109 0 pool|110 1 stool
111 1 barrel, cask|112 1 basket, handbasket|113 0 falls|114 0 tent|115 1 bag|116 1 minibike, motorbike
117 0 cradle|118 1 oven|119 1 ball|120 1 food, solid food|121 1 step, stair|122 0 tank, storage tank
123 1 trade name|124 1 microwave|125 1 pot|126 1 animal|127 1 bicycle|128 0 lake|129 1 dishwasher
130 1 screen|131 0 blanket, cover|132 1 sculpture|133 1 hood, exhaust hood|134 1 sconce|135 1 vase
136 1 traffic light|137 1 tray|138 1 trash can|139 1 fan|140 0 pier|141 0 crt screen|142 1 plate
143 1 monitor|144 1 bulletin board|145 0 shower|146 1 radiator|147 1 glass, drinking glass|148 1 clock
149 1 flag"""


def _parse(table: str) -> list[dict]:
    out = []
    for entry in table.replace("\n", "|").split("|"):
        idx, thing, name = entry.split(" ", 2)
        out.append({"id": int(idx), "isthing": int(thing), "name": name})
    return out


ADE20K_150_CATEGORIES = _parse(_TABLE)
assert [c["id"] for c in ADE20K_150_CATEGORIES] == list(range(150))
